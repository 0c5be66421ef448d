"""Video frames in through PyAV: decode prompts, fit them to the model; pixels <-> tensors; PNG frames out.

Frames are uint8 RGB arrays (N, H, W, 3). Reading accepts any container FFmpeg opens (MP4, WebM,
MKV, MOV, GIF, ...) or a folder of images. The streaming MP4 writer is `scd.mp4`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from scd.errors import ConfigError, VideoError

MAX_PIXELS_PER_FRAME = 8192 * 8192  # larger frames are refused before any is decoded
MAX_FRAMES = 100_000  # more are refused unless `last` or `max_frames` bounds what is kept
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FIT_MODES = ("crop", "pad", "stretch")
UPSCALE_MODES = ("nearest", "bicubic")
IMAGE_FPS = 30.0  # images carry no frame rate
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError, MemoryError)


@dataclass
class Clip:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    fps: float
    truncated: str | None = None  # what was wrong with a file cut short (its frames before the cut are kept)
    decoded: int | None = None  # frames decoded from the file's start; `frames` are its last ones (default: all)

    def __post_init__(self):
        if self.decoded is None:
            self.decoded = len(self.frames)

    @property
    def first_index(self) -> int:
        """The index, in the file as decoded, of `frames[0]`."""
        return self.decoded - len(self.frames)


# ----------------------------------------------------------------------------- reading


def read_video(path, last: int | None = None, max_frames: int | None = None) -> Clip:
    """Decode a video file (MP4, WebM, MKV, MOV, GIF, ...) or a folder of images to RGB uint8.

    Images in a folder (.png .jpg .jpeg .bmp .webp) are taken in natural name order (2 before 10) at
    30 fps and must share one size. `max_frames` decodes at most that many frames from the start;
    `last` then keeps the last N of them while streaming, so a long video never fills memory.
    Alpha is composited on black; grayscale, palette and 10-bit input come out as 8-bit RGB.
    A truncated file gives the frames before the damage and says so in `truncated`. Raises VideoError for a missing path, no
    images, no frames, bytes FFmpeg cannot decode, frames over MAX_PIXELS_PER_FRAME or more than
    MAX_FRAMES kept; ConfigError for `last` or `max_frames` below 1."""
    for name, value in (("last", last), ("max_frames", max_frames)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 frame, got {value}")
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path} does not exist; check the path")
    if path.is_dir():
        return _read_image_folder(path, last, max_frames)
    return _read_file(path, last, max_frames)


def _natural_key(path: Path) -> list:
    # even positions are text, odd positions digit runs, so comparisons never mix int and str
    return [int(t) if i % 2 else t.lower() for i, t in enumerate(re.split(r"(\d+)", path.name))]


def _check_size(width: int, height: int, source) -> None:
    if width <= 0 or height <= 0:
        # FFmpeg also leaves the size unknown when a frame is over max_pixels
        raise VideoError(f"{source} has no picture size FFmpeg accepts: it is not a video or image, or its "
                         f"frames are over {MAX_PIXELS_PER_FRAME} pixels (refused); check the file")
    if width * height > MAX_PIXELS_PER_FRAME:
        raise VideoError(f"{source} is {width}x{height}: frames over {MAX_PIXELS_PER_FRAME} pixels are refused; "
                         "downscale it first (e.g. ffmpeg -i IN -vf scale=1024:-2 OUT)")


def _check_count(count: int, source) -> None:
    if count > MAX_FRAMES:
        raise VideoError(f"{source} holds more than {MAX_FRAMES} frames; keep fewer with last or max_frames")


def _rgb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """One decoded frame as (height, width, 3) uint8 RGB; alpha composited on black."""
    fmt = frame.format
    if fmt.has_palette or any(c.is_alpha for c in fmt.components):
        rgba = frame.to_ndarray(width=width, height=height, format="rgba").astype(np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    return frame.to_ndarray(width=width, height=height, format="rgb24")


def _read_file(path: Path, last: int | None, max_frames: int | None) -> Clip:
    frames: collections.deque = collections.deque(maxlen=last)  # (H, W, 3) each
    keep = min((n for n in (last, max_frames) if n is not None), default=None)
    reader = VideoFrames(path, max_declared=MAX_FRAMES if keep is None or keep > MAX_FRAMES else None)
    with contextlib.closing(iter(reader)) as decoded:
        for frame in decoded:
            frames.append(frame)
            _check_count(len(frames), path)
            if reader.count == max_frames:
                break
    return Clip(np.stack(frames), reader.fps, reader.truncated, reader.count)


class VideoFrames:
    """The frames of one video file, decoded one at a time, so a long video never sits in memory.

    Iterate once: yields (H, W, 3) uint8 RGB frames. Raises VideoError (as read_video) when the
    file has no decodable frame. A file cut short ends at the damage and keeps the frames before
    it; `truncated` then says what was found (None for a whole file). `fps` and `count` are known
    as frames arrive; `max_declared` refuses a container that declares more frames up front."""

    def __init__(self, path, max_declared: int | None = None):
        self.path = Path(path)
        self.max_declared = max_declared
        self.count = 0
        self.fps = IMAGE_FPS
        self.truncated: str | None = None

    def __iter__(self):
        path = self.path
        declared, first_time = 0, None
        whole = _whole_boxes(path) if path.is_file() else None
        if whole is not None:
            self.truncated = "the file ends inside an MP4 box (cut while being written or copied)"
        try:
            # max_pixels also bounds the frames FFmpeg decodes while probing the streams
            with av.open(str(path) if whole is None else _Prefix(path, whole),
                         options={"max_pixels": str(MAX_PIXELS_PER_FRAME)}) as container:
                if not container.streams.video:
                    raise VideoError(f"{path} has no video stream")
                stream = container.streams.video[0]
                if stream.codec_context is None:
                    raise VideoError(f"{path}: no decoder here for its video codec; "
                                     "convert it to H.264 first (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")
                width, height = stream.codec_context.width, stream.codec_context.height
                _check_size(width, height, path)
                declared = stream.frames  # as declared by the container; 0 when unknown
                if self.max_declared is not None:
                    _check_count(declared, path)
                stream.codec_context.options = {"max_pixels": str(MAX_PIXELS_PER_FRAME)}
                is_image = container.format.name == "image2" or container.format.name.endswith("_pipe")
                rate = stream.average_rate
                timed = not is_image and not (rate and 0 < rate <= 1000)  # no declared rate (some GIFs, raw streams)
                if not is_image and not timed:
                    self.fps = float(rate)
                for frame in container.decode(stream):
                    self.count += 1
                    if timed and frame.time is not None:
                        first_time = frame.time if first_time is None else first_time
                        if self.count > 1 and frame.time > first_time:
                            self.fps = (self.count - 1) / (frame.time - first_time)
                    yield _rgb(frame, width, height)  # a size change mid-stream is scaled back
        except VideoError:
            if whole is not None and not self.count:
                raise VideoError(f"{path} is cut short before its first whole frame (it ends inside an MP4 box)") from None
            raise
        except _DECODE_ERRORS as err:
            if whole is not None and not self.count:
                raise VideoError(f"{path} is cut short before its first whole frame (it ends inside an MP4 box)") from None
            if not self.count and isinstance(err, EOFError):
                raise VideoError(f"{path} ends before its first video frame; is it empty or cut short?") from None
            reason = getattr(err, "strerror", None) or str(err).strip() or type(err).__name__
            if not self.count:
                raise VideoError(f"cannot decode {path} ({reason}); is it a video or image file?") from None
            self.truncated = self.truncated or f"decoding failed after frame {self.count} ({reason})"
        if not self.count:
            raise VideoError(f"{path} is cut short before its first whole frame (it ends inside an MP4 box)"
                             if whole is not None else f"{path} holds no video frames")
        if self.truncated is None and declared > self.count:
            self.truncated = f"it declares {declared} frames but only {self.count} decode"


def _whole_boxes(path: Path) -> int | None:
    """For an MP4/MOV file whose top-level boxes run past its end (cut while being written or
    copied), the end of its last whole box; None for a whole file or another format."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(12)[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"styp"):
            return None
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(16)
            box = struct.unpack(">I", head[:4])[0] if len(head) >= 8 else 0
            if box == 1 and len(head) == 16:  # a 64-bit size follows the type
                box = struct.unpack(">Q", head[8:16])[0]
            elif box == 0 and len(head) >= 8:  # the box runs to the end of the file
                return None
            if box < 8 or pos + box > size:
                return pos
            pos += box
        return None


class _Prefix(io.RawIOBase):
    """The first `end` bytes of a file, for FFmpeg: a cut MP4 read up to its last whole box
    (FFmpeg refuses some files cut inside a fragment's header)."""

    def __init__(self, path: Path, end: int):
        super().__init__()
        self.file, self.end = open(path, "rb"), end

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.file.read(max(0, min(len(buffer), self.end - self.file.tell())))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(self.end + offset) if whence == io.SEEK_END else self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()
        super().close()


def _read_image_folder(folder: Path, last: int | None, max_frames: int | None) -> Clip:
    images = [p for p in folder.iterdir()
              if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    if not images:
        raise VideoError(f"{folder} holds no images ({' '.join(IMAGE_SUFFIXES)}); "
                         "add frames there or pass a video file")
    images = sorted(images, key=_natural_key)[:max_frames]
    decoded = len(images)
    images = images[-last:] if last else images
    _check_count(len(images), folder)
    frames = []
    for image in images:
        frame = _read_file(image, None, 1).frames[0]
        if frames and frame.shape != frames[0].shape:
            (h0, w0), (h, w) = frames[0].shape[:2], frame.shape[:2]
            raise VideoError(f"{image.name} is {w}x{h} but {images[0].name} is {w0}x{h0}; "
                             f"resize the images in {folder} to one size")
        frames.append(frame)
    return Clip(np.stack(frames), IMAGE_FPS, None, decoded)


# ----------------------------------------------------------------------------- pixels


def _resize(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, height, width) in [0, 255]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def fit_frames(frames: np.ndarray, size: tuple[int, int], mode: str = "crop") -> np.ndarray:
    """Fit uint8 frames (N, H, W, 3) to size (h, w) -> uint8 (N, h, w, 3).

    crop (default): scale to cover (h, w) keeping the aspect ratio, then cut the center.
    pad: scale to fit inside keeping the aspect ratio, then center on black.
    stretch: scale to (h, w), ignoring the aspect ratio.
    Bilinear with antialiasing. Raises ConfigError for another mode."""
    if mode not in FIT_MODES:
        raise ConfigError(f"unknown fit mode {mode!r}: use {', '.join(FIT_MODES)}")
    h, w = size
    n, src_h, src_w = frames.shape[:3]
    if mode == "stretch":
        rh, rw = h, w
    elif mode == "crop":
        scale = max(h / src_h, w / src_w)
        rh, rw = max(h, round(src_h * scale)), max(w, round(src_w * scale))
    else:
        scale = min(h / src_h, w / src_w)
        rh, rw = max(1, min(h, round(src_h * scale))), max(1, min(w, round(src_w * scale)))
    top, left = abs(rh - h) // 2, abs(rw - w) // 2
    out = np.zeros((n, h, w, 3), np.uint8)
    for start in range(0, n, 16):  # chunks: a long clip never exists as one float tensor
        resized = _resize(frames[start:start + 16], rh, rw).round_().clamp_(0, 255).to(torch.uint8)
        resized = resized.permute(0, 2, 3, 1).numpy()  # (n, rh, rw, 3)
        if mode == "pad":
            out[start:start + 16, top:top + rh, left:left + rw] = resized
        else:
            out[start:start + 16] = resized[:, top:top + h, left:left + w]
    return out


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(tensor: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] (clamped) -> uint8 (N, H, W, 3), rounded."""
    x = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def check_upscale(factor: int, mode: str) -> None:
    if mode not in UPSCALE_MODES:
        raise ConfigError(f"unknown upscale mode {mode!r}: use {' or '.join(UPSCALE_MODES)}")
    if int(factor) != factor or factor < 1:
        raise ConfigError(f"the upscale factor must be a whole number >= 1, got {factor}")


def upscale_frames(frames: np.ndarray, factor: int, mode: str = "nearest") -> np.ndarray:
    """Enlarge uint8 (N, H, W, 3) frames `factor` times -> (N, H*factor, W*factor, 3), for viewing.

    nearest repeats pixels (exact); bicubic interpolates. Raises ConfigError for another mode or a
    factor below 1."""
    check_upscale(factor, mode)
    factor = int(factor)
    if factor == 1:
        return frames
    if mode == "nearest":
        return frames.repeat(factor, axis=1).repeat(factor, axis=2)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# ----------------------------------------------------------------------------- writing
# MP4 writing lives in scd.mp4; PNG frames are written here.


def write_png_frames(directory, frames: np.ndarray, start_index: int = 0) -> list[Path]:
    """Write uint8 (N, H, W, 3) frames as directory/frame_000000.png, ... numbered from start_index,
    creating the directory. Raises VideoError when it cannot be written."""
    directory = Path(directory)
    paths = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            path = directory / f"frame_{start_index + i:06d}.png"
            iio.imwrite(path, np.ascontiguousarray(frame), extension=".png")
            paths.append(path)
    except OSError as err:
        raise VideoError(f"cannot write frames to {directory}: {err.strerror or err}") from None
    return paths
