"""Latent datasets: a folder of videos encoded once through a codec, stored as safetensors shards.

```
DATASET/
  index.json               # format, codec, shapes, action and class names, every shard (its clips, size, sha256), what was skipped
  shard-00000.safetensors  # "<i>.latents" (N, C, h, w) per clip, "<i>.actions" (N,) int64 when there are actions,
                           # "<i>.text" (L, D) float32, a captioned clip's text embedding (its L real tokens)
  codec/                   # the autoencoder of a DC-AE dataset, so that a model trained on it can decode
```

Input: video files, either directly in the folder or one level down in class folders
(`VIDEOS/<class>/<clip>.avi`, UCF-101's layout: the folder name is the clip's class label), each
with an optional `<clip>.actions.txt` beside it (one action per frame, names or indices).

Text-conditioned models (the Wan family) take captioned clips: each video's caption is the
`<clip>.txt` beside it, or its entry in a captions file (`captions`: relative path -> caption). The
caption is embedded once by the model base's umT5 (`scd.text.encode_prompts`) and stored as its real
tokens; a reader pads it back to `text_len` with zero rows, exactly the tensor generation feeds the
model. Wan's causal VAE compresses time 4x, so a video is cut into clips of `clip_frames` (1 + 4k)
frames, each encoded alone (frames past the last whole clip are dropped and reported); such a
dataset counts frames in latent frames and records the text encoder it was embedded with.

Writing goes shard by shard: a shard is written under a temporary name and renamed, then the index
that lists it replaces the old index the same way, so a kill loses at most the shard being filled
and encoding again into the same folder continues where the index ends (a video cut by a shard
boundary resumes at its first frame not yet stored). Memory holds one shard plus one chunk of
frames, whatever the folder's size; a long video is split into clips at shard boundaries. A pixel
dataset stores uint8 frames (exact, 4x smaller than float); a DC-AE dataset stores scaled latents.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scd import files, video
from scd.actions import parse_actions, sidecar_path
from scd.codecs import (
    CODEC_DIR,
    DCAE_CONFIG,
    DCAE_WEIGHTS,
    CodecConfig,
    DCAECodec,
    PixelCodec,
    build_dcae,
    load_codec,
)
from scd.errors import ActionError, ConfigError, DataError, VideoError

INDEX = "index.json"
FORMAT = "scd-latents"
FORMAT_VERSION = 1
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".m4v", ".gif", ".avi")
DTYPES = {"uint8": torch.uint8, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what a dataset was made with: encoding more into it must not change any of these
SETTINGS = ("codec", "codec_fingerprint", "frame_size", "latent_shape", "dtype", "fit", "action_names", "num_actions", "labels",
            "text_encoder", "text_len", "clip_frames")
CAPTION_SUFFIX = ".txt"
SKIP_REASONS = ("corrupt", "too short", "bad actions")


# ----------------------------------------------------------------------------- what to encode with

@dataclass
class Encoding:
    """A codec and the frame size it takes; `config` is the model config's codec entry."""
    codec: object  # PixelCodec or DCAECodec
    config: CodecConfig
    frame_size: tuple[int, int]
    action_names: tuple[str, ...] = ()
    fit: str = "crop"
    dtype: str = "float32"  # storage of DC-AE latents (pixels are stored as uint8)
    codec_folder: Path | None = None  # a model's codec/ folder, copied byte for byte
    num_actions: int | None = None  # actions 0..num_actions-1 (default: one per name; 0: clips carry no actions)
    device: torch.device = torch.device("cpu")  # where the codec runs
    # text-conditioned models: captions embedded by the umT5 of `text_base` (`text_identity` names it)
    text_base: Path | None = None
    text_identity: str | None = None
    text_len: int = 0
    captions: dict | None = None  # relative video path -> caption (None: NAME.txt beside each video)
    clip_frames: int | None = None  # the Wan VAE: video frames per clip (1 + 4k), each encoded alone

    def __post_init__(self):
        self.config = CodecConfig.from_dict(self.config)
        if self.config.is_pixel:
            self.dtype = "uint8"
        elif self.dtype not in DTYPES or self.dtype == "uint8":
            raise ConfigError(f"dtype must be float32, bfloat16 or float16 for latents, not {self.dtype!r}", "dtype")
        if self.fit not in video.FIT_MODES:
            raise ConfigError(f"fit must be one of {', '.join(video.FIT_MODES)}, not {self.fit!r}", "fit")
        scale = getattr(self.codec, "scale", 1)
        if len(self.frame_size) != 2 or min(self.frame_size) < 1 or any(s % scale for s in self.frame_size):
            raise ConfigError(f"frame_size {tuple(self.frame_size)} must be two positive multiples of the codec's "
                              f"downsampling ({scale})", "frame_size")
        self.frame_size = tuple(int(s) for s in self.frame_size)
        self.action_names = tuple(self.action_names)
        if self.num_actions is None:
            self.num_actions = len(self.action_names)
        if self.action_names and self.num_actions != len(self.action_names):
            raise ConfigError(f"{len(self.action_names)} action names for {self.num_actions} actions", "num_actions")
        if self.clip_frames is not None and (self.clip_frames < 5 or (self.clip_frames - 1) % 4):
            raise ConfigError(f"clip_frames must be 1 + 4k frames (5, 9, ... 81), the Wan VAE's grouping; got "
                              f"{self.clip_frames}", "clip_frames")

    def key(self) -> str:
        """8 hex digits naming these settings: datasets encoded differently get different keys."""
        settings = [self.config.to_dict(), codec_fingerprint(self.codec), self.frame_size, self.action_names,
                    self.num_actions, self.fit, self.dtype] + ([self.text_identity, self.text_len, self.clip_frames]
                                                               if self.text_identity else [])
        return hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:8]


def pixel_encoding(frame_size: tuple[int, int], action_names=(), fit: str = "crop", num_actions: int | None = None) -> Encoding:
    """Frames stored as they are (pixel-space models)."""
    return Encoding(PixelCodec(), CodecConfig(), tuple(frame_size), tuple(action_names), fit, num_actions=num_actions)


def model_encoding(loaded, frame_size=None, fit: str = "crop", dtype: str = "float32", captions: dict | None = None,
                   clip_frames: int = 81) -> Encoding:
    """The codec, frame size and action names of a loaded model (its folder's codec/ for DC-AE); a
    text-conditioned model's base VAE and text encoder, with `captions` and `clip_frames`."""
    config = loaded.config
    if config.condition == "text":
        from scd import text

        base = loaded.base()
        return Encoding(loaded.codec, config.codec, tuple(frame_size or config.frame_size), (), fit, dtype, None, 0,
                        text_base=base, text_identity=text.encoder_identity(base, loaded.base_revision),
                        text_len=config.text_len, captions=captions, clip_frames=clip_frames)
    if captions is not None:
        raise ConfigError(f"captions go with a text-conditioned model; {loaded.source} is conditioned on "
                          f"{config.condition or 'nothing'}", "captions")
    codec = load_codec(config.codec, loaded.folder)
    names = config.action_names if config.condition == "action" else ()
    folder = None if config.codec.is_pixel else Path(loaded.folder) / CODEC_DIR
    return Encoding(codec, config.codec, tuple(frame_size or config.frame_size), names, fit, dtype, folder,
                    config.num_classes if config.condition == "action" else 0)


def dcae_encoding(codec: str | Path, codec_config=None, scaling_factor: float | None = None, frame_size=(256, 256),
                  action_names=(), fit: str = "crop", dtype: str = "float32", num_actions: int | None = None) -> Encoding:
    """A DC-AE given as a diffusers folder or as a state dict with its config json (not needed for
    FAR's published DC-AEs), as `convert` takes it."""
    from scd.convert import CodecSpec, read_codec

    read, entry = read_codec(CodecSpec(codec, codec_config, scaling_factor), channels=None)
    autoencoder = build_dcae(read.config, read.state, read.origin)
    config = CodecConfig.from_dict(entry)
    return Encoding(DCAECodec(autoencoder, config.scaling_factor, config.downsample), config, tuple(frame_size),
                    tuple(action_names), fit, dtype, num_actions=num_actions)


def encoding_for(model: str | Path | None = None, codec: str | Path | None = None, codec_config=None,
                 scaling_factor: float | None = None, frame_size: tuple[int, int] | None = None,
                 action_names=None, fit: str = "crop", dtype: str = "float32", device: str = "cpu",
                 num_actions: int | None = None, captions: dict | None = None, clip_frames: int = 81) -> Encoding:
    """What `encode_folder` encodes with: a model's codec (and its frame size and action names), a
    DC-AE (`codec`, as `convert` takes it), or, with neither, pixels at `frame_size`; the codec
    runs on `device` (auto, cpu, cuda, ...). Action files hold `action_names` (or indices below
    `num_actions`, for actions without names). A text-conditioned model's clips are captioned
    (`captions`, else NAME.txt files) and cut into `clip_frames` video frames."""
    if captions is not None and model is None:
        raise ConfigError("captions go with a text-conditioned model: give model", "captions")
    encoding = _encoding_for(model, codec, codec_config, scaling_factor, frame_size, action_names, fit, dtype, num_actions,
                             captions, clip_frames)
    from scd.devices import resolve_device

    encoding.device = resolve_device(device)
    encoding.codec.to(encoding.device)
    return encoding


def _encoding_for(model, codec, codec_config, scaling_factor, frame_size, action_names, fit, dtype, num_actions,
                  captions=None, clip_frames=81) -> Encoding:
    if model is not None and codec is not None:
        raise ConfigError("give a model or a codec, not both: the model's codec is the one its latents need", "codec")
    if model is not None:
        from scd.checkpoints import load_model

        encoding = model_encoding(load_model(model), frame_size, fit, dtype, captions, clip_frames)
        if action_names is not None and tuple(action_names) != encoding.action_names:
            raise ConfigError(f"the model's actions are {list(encoding.action_names)}: leave action_names out", "action_names")
        if num_actions is not None and num_actions != encoding.num_actions:
            raise ConfigError(f"the model has {encoding.num_actions} actions: leave num_actions out", "num_actions")
        return encoding
    if frame_size is None:
        raise ConfigError("frame_size is needed without a model (the size the videos are fitted to)", "frame_size")
    if codec is not None:
        return dcae_encoding(codec, codec_config, scaling_factor, frame_size, action_names or (), fit, dtype, num_actions)
    if codec_config is not None or scaling_factor is not None:
        raise ConfigError("codec_config goes with a codec", "codec_config") if codec_config is not None else \
            ConfigError("scaling_factor goes with a codec", "scaling_factor")
    return pixel_encoding(frame_size, action_names or (), fit, num_actions)


# ----------------------------------------------------------------------------- events

@dataclass
class EncodeStarted:
    files: int  # video files in the folder
    already: int  # of them, encoded (or skipped) by an earlier run into the same folder


@dataclass
class FileEncoded:
    source: str
    frames: int  # frames stored (0 when skipped)
    skipped: str | None = None  # one of SKIP_REASONS
    detail: str | None = None  # why it was skipped, or what was wrong with a truncated file
    truncated: bool = False  # its frames before the damage were kept


@dataclass
class ShardWritten:
    file: str
    clips: int
    bytes: int


@dataclass
class EncodeReport:
    out: Path
    files: int
    clips: int
    frames: int
    shards: int
    bytes: int
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> [(source, detail)]
    truncated: list[tuple[str, str]] = field(default_factory=list)
    resumed: int = 0  # files an earlier run had done
    actions: list[tuple[str, str]] = field(default_factory=list)  # videos whose action file does not fit their frames


# ----------------------------------------------------------------------------- the folder

def list_videos(folder: Path) -> tuple[list[tuple[str, int | None]], tuple[str, ...]]:
    """[(path relative to folder, class index or None)], class names. Videos directly in the
    folder, or one level down in class folders; not both."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"the video folder {folder} does not exist")
    is_video = lambda p: p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")
    flat = sorted(p.name for p in folder.iterdir() if is_video(p))
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and any(is_video(q) for q in p.iterdir()))
    if flat and classes:
        raise DataError(f"{folder} holds videos both directly and in class folders ({classes[0]}/...): "
                        "put every video in a class folder, or none")
    if classes:
        return [(f"{name}/{p.name}", i) for i, name in enumerate(classes)
                for p in sorted(folder.joinpath(name).iterdir(), key=lambda p: p.name) if is_video(p)], tuple(classes)
    if not flat:
        raise DataError(f"{folder} holds no videos ({' '.join(VIDEO_SUFFIXES)})")
    return [(name, None) for name in flat], ()


# ----------------------------------------------------------------------------- writing

def codec_fingerprint(codec) -> str | None:
    """sha256 over the autoencoder's tensors (names and bytes): equal for the same weights however
    they were stored; None for pixels."""
    autoencoder = getattr(codec, "autoencoder", None)
    if autoencoder is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(autoencoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_codec(out: Path, encoding: Encoding) -> None:
    """The DC-AE into out/codec/, once."""
    if encoding.config.is_pixel or encoding.config.type == "wan":  # the Wan VAE stays in the model's base
        return
    folder = out / CODEC_DIR
    if not (folder / DCAE_WEIGHTS).is_file():
        tmp = out / f".{CODEC_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if encoding.codec_folder is not None:
                shutil.copytree(encoding.codec_folder, tmp)
            else:
                tmp.mkdir()
                autoencoder = encoding.codec.autoencoder
                state = {k: v.detach().contiguous().cpu() for k, v in autoencoder.state_dict().items()}
                save_file(state, str(tmp / DCAE_WEIGHTS), metadata={"format": "pt"})
                config = {"_class_name": "AutoencoderDC", **{k: v for k, v in dict(autoencoder.config).items()
                                                             if not k.startswith("_")},
                          "scaling_factor": encoding.config.scaling_factor}
                (tmp / DCAE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            os.replace(tmp, folder)
        except OSError as err:
            raise DataError(f"cannot write the codec into {folder}: {err.strerror or err}") from None


def _new_index(encoding: Encoding, labels: tuple[str, ...], fingerprint: str | None) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "codec": encoding.config.to_dict(), "codec_fingerprint": fingerprint,
            "frame_size": list(encoding.frame_size), "latent_shape": None, "dtype": encoding.dtype,
            "fit": encoding.fit, "action_names": list(encoding.action_names),
            "num_actions": encoding.num_actions, "labels": list(labels), "text_encoder": encoding.text_identity,
            "text_len": encoding.text_len or None, "clip_frames": encoding.clip_frames,
            "shards": [], "done": {}, "partial": None, "skipped": [], "complete": False}


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read the dataset index {path}: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not an scd latent dataset index")
    if index.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} is dataset format version {index.get('version')}; this scd reads {FORMAT_VERSION}")
    return index


def _open_out(out: Path, fresh: dict) -> dict:
    """The index to continue: a new one for an empty folder, the folder's own when its settings
    match; stray files of a killed run are removed."""
    if out.exists() and not out.is_dir():
        raise DataError(f"the dataset path {out} is a file: give a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / INDEX).is_file():
        if any(p.name != CODEC_DIR and not p.name.startswith(".") for p in out.iterdir()):
            raise DataError(f"{out} is not empty and holds no dataset index: choose an empty or new folder")
        return fresh
    index = _read_index(out / INDEX)
    differ = [k for k in SETTINGS if k != "latent_shape" and index.get(k) != json.loads(json.dumps(fresh[k]))]
    if differ:
        shown = ", ".join(f"{k} {index.get(k)!r} -> {fresh[k]!r}" for k in differ[:3])
        raise DataError(f"{out} holds a dataset made with other settings ({shown}): encode into another folder")
    listed = {s["file"] for s in index["shards"]}
    for p in out.iterdir():  # a shard written but not yet listed, or a temporary file, is from a killed run
        if (p.name.startswith("shard-") and p.name not in listed) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            p.unlink()
    return index


class _Shard:
    """The clips being collected for the next shard file."""

    def __init__(self, number: int):
        self.number, self.tensors, self.clips, self.bytes = number, {}, [], 0

    @property
    def file(self) -> str:
        return f"shard-{self.number:05d}.safetensors"

    def add(self, latents: list[torch.Tensor], actions: torch.Tensor | None, entry: dict) -> None:
        key = str(len(self.clips))
        self.tensors[f"{key}.latents"] = torch.cat(latents)
        if actions is not None:
            self.tensors[f"{key}.actions"] = actions
        self.clips.append({"key": key, **entry})


class _Writer:
    """The dataset folder being written: its index, the shard being filled, the commit order."""

    def __init__(self, out: Path, index: dict, budget: int):
        self.out, self.index, self.budget = out, index, budget
        self.shard = _Shard(len(index["shards"]))

    @property
    def full(self) -> bool:
        return self.shard.bytes >= self.budget

    def skip(self, source: str, reason: str, detail: str) -> FileEncoded:
        self.index["skipped"].append({"source": source, "reason": reason, "detail": detail})
        return FileEncoded(source, 0, reason, detail)

    def commit(self, partial: dict | None = None) -> ShardWritten | None:
        """Write the shard, then the index that lists it (and, with `partial`, the video it cut)."""
        shard, index = self.shard, self.index
        written = None
        if shard.clips:
            if index["latent_shape"] is None:
                index["latent_shape"] = list(shard.tensors[f"{shard.clips[0]['key']}.latents"].shape[1:])
            path = self.out / shard.file
            files.atomic_write(path, lambda tmp: save_file(shard.tensors, str(tmp), metadata={"format": FORMAT}), DataError, "shard")
            index["shards"].append({"file": shard.file, "clips": shard.clips, "bytes": path.stat().st_size,
                                    "sha256": files.file_sha256(path)})
            written = ShardWritten(shard.file, len(shard.clips), index["shards"][-1]["bytes"])
        index["partial"] = partial
        files.write_text(self.out / INDEX, json.dumps(index, indent=1) + "\n", DataError, "dataset index")
        self.shard = _Shard(len(index["shards"]))
        return written


def encode_folder(videos: str | Path, out: str | Path, encoding: Encoding, *, shard_mb: float = 256.0,
                  min_frames: int = 2, chunk: int = 16):
    """Encode every video of `videos` into the dataset folder `out`, yielding EncodeStarted, a
    FileEncoded per video, a ShardWritten per shard, and last the EncodeReport. Encoding again
    into the same folder continues a killed run and adds videos that are new; it refuses a folder
    made with other settings. Skips (and reports) corrupt videos, videos under `min_frames`
    frames and unreadable action files; a truncated video keeps its frames and is reported.
    Raises DataError for a missing or empty folder or one it cannot write, ConfigError for bad settings."""
    videos, out = Path(videos), Path(out)
    if shard_mb <= 0 or min_frames < 1 or chunk < 1:
        bad = "shard_mb" if shard_mb <= 0 else "min_frames" if min_frames < 1 else "chunk"
        raise ConfigError(f"{bad} must be positive", bad)
    sources, labels = list_videos(videos)
    if out.resolve() == videos.resolve() or videos.resolve() in out.resolve().parents:
        raise ConfigError(f"out {out} is inside the video folder: choose another folder", "out")
    if not encoding.num_actions:
        with_actions = [rel for rel, _ in sources if sidecar_path(videos / rel).is_file()]
        if with_actions:
            raise DataError(f"{sidecar_path(videos / with_actions[0]).name} holds actions but no action names were given "
                            "(action_names): name the actions (or give their number when the files hold indices), "
                            "or remove the action files", "action_names")
    index = _open_out(out, _new_index(encoding, labels, codec_fingerprint(encoding.codec)))
    _save_codec(out, encoding)
    finished = set(index["done"]) | {s["source"] for s in index["skipped"]}
    yield EncodeStarted(len(sources), sum(1 for rel, _ in sources if rel in finished))
    writer = _Writer(out, index, int(shard_mb * (1 << 20)))
    for rel, label in sources:
        if rel not in finished:
            yield from _encode_video(writer, videos, rel, label, encoding, min_frames, chunk)
            if writer.full:
                yield writer.commit()
    index["complete"] = True
    last = writer.commit()
    if last is not None:
        yield last
    yield _report(out, index, len(sources), len(finished))


def _encode_video(writer: _Writer, videos: Path, rel: str, label: int | None, encoding: Encoding,
                  min_frames: int, chunk: int):
    """One video into the writer's shards, cut into clips where a shard fills up; events as encode_folder's."""
    if encoding.text_identity is not None:
        yield from _encode_captioned(writer, videos, rel, encoding)
        return
    index, path = writer.index, videos / rel
    partial = index["partial"] if index["partial"] and index["partial"]["source"] == rel else None
    resume_at, part = (partial["frames"], partial["parts"]) if partial else (0, 0)  # what a killed run stored
    actions = None
    if encoding.num_actions:
        try:
            actions = parse_actions(sidecar_path(path), encoding.action_names, encoding.num_actions) \
                if sidecar_path(path).is_file() else []
        except ActionError as err:
            yield writer.skip(rel, "bad actions", str(err))
            return
    reader = video.VideoFrames(path)
    segment, first = [], resume_at

    def add_clip(last: int, truncated: str | None = None) -> None:
        """Frames first..last - 1 of the video, as clip `part`."""
        nonlocal part
        conditions = None
        if actions is not None:  # frames the action file does not cover get the null action
            null = encoding.num_actions
            conditions = torch.tensor((actions[first:last] + [null] * (last - first))[:last - first], dtype=torch.int64)
        writer.shard.add(segment, conditions, {"source": rel, "part": part, "first_frame": first, "frames": last - first,
                                               "label": label, "fps": reader.fps, "truncated": truncated})
        part += 1

    try:
        with contextlib.closing(iter(reader)) as decoded:
            for frames in _chunks(decoded, chunk):
                if reader.count <= resume_at:  # chunks stay aligned: a cut falls at a chunk's end
                    continue
                latents = _encode(frames, encoding, DTYPES[encoding.dtype])
                segment.append(latents)
                writer.shard.bytes += latents.numel() * latents.element_size()
                if writer.full and reader.count >= min_frames:  # the shard is full: cut the video here
                    add_clip(reader.count)
                    segment, first = [], reader.count
                    yield writer.commit({"source": rel, "frames": first, "parts": part})
    except VideoError as err:
        yield writer.skip(rel, "corrupt", str(err))
        return
    total = reader.count
    if total < min_frames:
        yield writer.skip(rel, "too short", f"{total} frames, fewer than min_frames {min_frames}")
        return
    if segment:
        add_clip(total, reader.truncated)
    index["done"][rel] = {"frames": total, "truncated": reader.truncated, "actions": _actions_note(actions, total, path)}
    if partial is not None:
        index["partial"] = None
    if reader.truncated:  # every clip of the video says so, also those already in shards
        for clip in (c for s in index["shards"] for c in s["clips"] if c["source"] == rel):
            clip["truncated"] = reader.truncated
    yield FileEncoded(rel, total, None, reader.truncated, reader.truncated is not None)


def read_captions(path: str | Path) -> dict[str, str]:
    """A captions file: a JSON object {video path relative to the folder: caption}."""
    path = Path(path)
    try:
        captions = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"the captions file {path} does not exist", "captions") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read the captions file {path}: {err}", "captions") from None
    if not isinstance(captions, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in captions.items()):
        raise DataError(f"the captions file {path} must be a JSON object of video path -> caption text", "captions")
    return captions


def _caption(videos: Path, rel: str, encoding: Encoding) -> tuple[str | None, str]:
    """A video's caption (None when it has none) and where it was looked for."""
    if encoding.captions is not None:
        text = encoding.captions.get(rel)
        return (text.strip() or None if text is not None else None), "the captions file"
    path = (videos / rel).with_suffix(CAPTION_SUFFIX)
    try:
        return path.read_text(encoding="utf-8").strip() or None, path.name
    except FileNotFoundError:
        return None, path.name
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{path.name} ({err})"


def _encode_captioned(writer: _Writer, videos: Path, rel: str, encoding: Encoding):
    """A captioned video for a text-conditioned model: its caption embedded once, the video cut into
    clips of `clip_frames` frames, each through the Wan VAE alone (its causal grouping starts anew)."""
    from scd import text

    caption, where = _caption(videos, rel, encoding)
    if caption is None:
        yield writer.skip(rel, "no caption", f"no caption in {where}")
        return
    try:
        clip = video.read_video(videos / rel)
    except VideoError as err:
        yield writer.skip(rel, "corrupt", str(err))
        return
    n, total = encoding.clip_frames, len(clip.frames)
    if total < n:
        yield writer.skip(rel, "too short", f"{total} frames, fewer than a clip of clip_frames {n}")
        return
    embedded = text.encode_prompts(encoding.text_base, caption, text_len=encoding.text_len)
    rows = embedded.embeddings[0, :embedded.lengths[0]].float().contiguous()
    dtype = DTYPES[encoding.dtype]
    for part, start in enumerate(range(0, total - n + 1, n)):
        fitted = video.fit_frames(clip.frames[start:start + n], encoding.frame_size, encoding.fit)
        pixels = video.frames_to_tensor(fitted).to(encoding.device)[None]
        latents = encoding.codec.encode(pixels)[0].to(dtype).cpu().contiguous()  # (1 + (n - 1) / 4, C, h, w)
        writer.shard.add([latents], None, {"source": rel, "part": part, "first_frame": start, "frames": len(latents),
                                           "label": None, "fps": clip.fps, "truncated": clip.truncated,
                                           "text_tokens": len(rows)})
        writer.shard.tensors[f"{writer.shard.clips[-1]['key']}.text"] = rows.clone()  # one per clip: safetensors shares none
        writer.shard.bytes += latents.numel() * latents.element_size() + rows.numel() * 4
    dropped = total % n
    writer.index["done"][rel] = {"frames": total, "truncated": clip.truncated, "actions": None,
                                 "dropped_frames": dropped or None}
    yield FileEncoded(rel, total, None, clip.truncated, clip.truncated is not None)


def _chunks(frames, size: int):
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(frames: list[np.ndarray], encoding: Encoding, dtype: torch.dtype) -> torch.Tensor:
    """uint8 frames -> stored latents (n, C, h, w): uint8 pixels, or the codec's latents in `dtype`."""
    fitted = video.fit_frames(np.stack(frames), encoding.frame_size, encoding.fit)
    if dtype == torch.uint8:
        return torch.from_numpy(fitted).permute(0, 3, 1, 2).contiguous()
    return encoding.codec.encode(video.frames_to_tensor(fitted).to(encoding.device)).to(dtype).cpu().contiguous()


def _actions_note(actions: list[int] | None, frames: int, path: Path) -> str | None:
    """What the report says of a video whose action file does not list one action per frame."""
    if actions is None or len(actions) == frames:
        return None
    if not actions:
        return f"no {sidecar_path(path).name}: all {frames} frames take the null action"
    if len(actions) < frames:
        return f"{len(actions)} actions for {frames} frames: frames {len(actions)}-{frames - 1} take the null action"
    return f"{len(actions)} actions for {frames} frames: the last {len(actions) - frames} are not used"


def _report(out: Path, index: dict, files: int, resumed: int) -> EncodeReport:
    clips = [c for s in index["shards"] for c in s["clips"]]
    skipped: dict[str, list] = collections.defaultdict(list)
    for s in index["skipped"]:
        skipped[s["reason"]].append((s["source"], s["detail"]))
    truncated = [(rel, d["truncated"]) for rel, d in index["done"].items() if d["truncated"]]
    actions = [(rel, d["actions"]) for rel, d in index["done"].items() if d.get("actions")]
    return EncodeReport(out, files, len(clips), sum(c["frames"] for c in clips), len(index["shards"]),
                        sum(s["bytes"] for s in index["shards"]), dict(skipped), truncated, resumed, actions)


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class StoredClip:
    shard: str
    key: str
    frames: int
    label: int | None
    source: str


def check_shard(folder: Path, entry: dict, checksum: bool = False) -> str | None:
    """What is wrong with one shard of the index (None: nothing): missing, not the size the index
    lists, a safetensors header that does not parse or lacks a clip's tensors; with `checksum`
    also bytes that differ from the sha256 stored at encode time (datasets encoded before checksums
    were stored have none, and are read without that check)."""
    path = folder / entry["file"]
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"it cannot be read ({err.strerror.lower() if err.strerror else err})"
    if entry.get("bytes") is not None and size != entry["bytes"]:
        return f"it is {size} bytes but the index lists {entry['bytes']} (cut short or replaced)"
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= size - 8:
                return "its header is damaged (a header length past the end of the file)"
            header = json.loads(f.read(length))
        data = size - 8 - length
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= data:
                return f"its header is damaged (tensor {key} lies outside the file)"
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return "its header is damaged (not a safetensors header)"
    for clip in entry["clips"]:
        info = header.get(f"{clip['key']}.latents")
        if not isinstance(info, dict) or not info.get("shape") or info["shape"][0] != clip["frames"]:
            return f"its header does not hold clip {clip['key']} ({clip['frames']} frames of {clip['source']})"
    if checksum and entry.get("sha256") and files.file_sha256(path) != entry["sha256"]:
        return "its bytes differ from the checksum stored when it was encoded (damaged on disk or in a copy)"
    return None


class LatentDataset:
    """A finished dataset folder opened for reading: clip windows are read from the shards
    (memory-mapped, only the frames asked for), so memory does not grow with the dataset.

    Every shard's size and header are checked on opening, and its sha256 (stored by encode_folder)
    the first time a process reads it. A bad shard raises DataError naming it, unless
    `skip_bad_shards`: then every checksum is checked on opening too (so what is skipped is known
    before any batch is drawn) and the bad shards' clips are left out, listed in `skipped_shards`
    as (file, what is wrong)."""

    def __init__(self, folder: str | Path, skip_bad_shards: bool = False):
        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file():
            raise DataError(f"{self.folder} is not a latent dataset: it has no {INDEX}")
        index = _read_index(self.folder / INDEX)
        if not index.get("complete"):
            raise DataError(f"the dataset {self.folder} is incomplete ({len(index['done'])} videos encoded): "
                            "finish it by encoding the same videos into it again")
        self.index = index
        self.codec = CodecConfig.from_dict(index["codec"])
        self.dtype = index["dtype"]
        self.frame_size = tuple(index["frame_size"])
        self.latent_shape = tuple(index["latent_shape"] or ())
        self.action_names = tuple(index["action_names"])
        self.num_actions = int(index.get("num_actions", len(self.action_names)))
        self.labels = tuple(index["labels"])
        self.text_encoder = index.get("text_encoder")  # captioned clips: the identity of the encoder that embedded them
        self.text_len = int(index.get("text_len") or 0)
        self.skipped_shards: list[tuple[str, str]] = []
        shards = []
        for entry in index["shards"]:
            problem = check_shard(self.folder, entry, checksum=skip_bad_shards)
            if problem is None:
                shards.append(entry)
            elif skip_bad_shards:
                self.skipped_shards.append((entry["file"], problem))
            else:
                raise DataError(bad_shard(self.folder / entry["file"], problem), "skip_bad_shards")
        self._checksums = {s["file"]: None if skip_bad_shards else s.get("sha256") for s in shards}  # still to verify
        self.clips = [StoredClip(s["file"], c["key"], c["frames"], c["label"], c["source"])
                      for s in shards for c in s["clips"]]
        fps = [c["fps"] for s in index["shards"] for c in s["clips"] if c.get("fps")]
        self.fps = float(collections.Counter(round(f, 3) for f in fps).most_common(1)[0][0]) if fps else 8.0
        self._open: collections.OrderedDict = collections.OrderedDict()
        if not self.clips:
            raise DataError(f"the dataset {self.folder} holds no clips" +
                            (f" that can be read ({len(self.skipped_shards)} bad shards skipped)" if self.skipped_shards else ""))

    @property
    def codec_folder(self) -> Path | None:
        folder = self.folder / CODEC_DIR
        return folder if folder.is_dir() else None

    @property
    def codec_fingerprint(self) -> str | None:
        return self.index.get("codec_fingerprint")

    def __getstate__(self):  # DataLoader workers get their own file handles
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def _shard(self, name: str):
        handle = self._open.pop(name, None)
        if handle is None:
            expected = self._checksums.get(name)
            if expected is not None:  # once per process: the bytes are what encode wrote
                try:
                    same = files.file_sha256(self.folder / name) == expected
                except OSError as err:
                    raise DataError(bad_shard(self.folder / name, f"it cannot be read ({err.strerror or err})"),
                                    "skip_bad_shards") from None
                if not same:
                    raise DataError(bad_shard(self.folder / name, "its bytes differ from the checksum stored when it "
                                                                  "was encoded (damaged on disk or in a copy)"), "skip_bad_shards")
                self._checksums[name] = None
            try:
                handle = safe_open(str(self.folder / name), framework="pt")
            except Exception as err:  # OSError, or safetensors' own error for a bad header
                raise DataError(bad_shard(self.folder / name, f"it cannot be read ({err})"), "skip_bad_shards") from None
            if len(self._open) >= 8:  # a few open shards, not all of them
                self._open.popitem(last=False)
        self._open[name] = handle
        return handle

    def window(self, clip: int, first: int, frames: int, condition: str | None, null: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames first..first+frames-1 of clip `clip`: (latents float32 (frames, C, h, w) in the
        models' units, conditions (frames,) int64): for `condition` "action" the clip's actions,
        for "label" its class label repeated; `null` where the clip has none or for None; for
        "text" the caption's embedding (text_len, D) float32 instead."""
        c = self.clips[clip]
        handle = self._shard(c.shard)
        latents = handle.get_slice(f"{c.key}.latents")[first:first + frames]
        latents = latents.float() / 127.5 - 1.0 if latents.dtype == torch.uint8 else latents.float()
        if condition == "text":  # the caption's rows, padded back to text_len as encode_prompts returns them
            rows = handle.get_tensor(f"{c.key}.text").float()
            return latents, torch.cat([rows, rows.new_zeros(self.text_len - len(rows), rows.shape[1])])
        if condition == "action" and self.num_actions:
            return latents, handle.get_slice(f"{c.key}.actions")[first:first + frames]
        label = c.label if condition == "label" and c.label is not None else null
        return latents, torch.full((frames,), label, dtype=torch.int64)


def bad_shard(path: Path, problem: str) -> str:
    """The one line that names a bad shard and what to do."""
    return (f"the dataset shard {path} is damaged: {problem}; encode the videos again into a new folder, "
            "or skip the bad shards (skip_bad_shards)")


def is_dataset(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()
