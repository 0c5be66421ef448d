"""Video in and out through PyAV: decode prompts, fit them to the model, stream frames to MP4.

Frames are uint8 RGB arrays (N, H, W, 3). The writer produces fragmented H.264 MP4 (yuv420p) and
flushes every frame, so the file plays with every finished frame even if the process dies.
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from scd.errors import ConfigError, VideoError

MAX_PIXELS_PER_FRAME = 8192 * 8192  # larger frames are refused before anything is decoded
MAX_FRAMES = 100_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
FIT_MODES = ("crop", "pad", "stretch")


@dataclass
class Clip:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    fps: float


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _check_size(width: int, height: int, source) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(f"{source} has no picture size; is it a video?")
    if width * height > MAX_PIXELS_PER_FRAME:
        raise VideoError(f"{source} is {width}x{height}: frames over {MAX_PIXELS_PER_FRAME} pixels are refused; "
                         "downscale it first (e.g. ffmpeg -vf scale=512:-2)")


def _decode(path: Path, keep: int | None, max_frames: int | None) -> tuple[list[np.ndarray], float]:
    """Decode frames of one container; keeps only the last `keep` in a bounded deque."""
    limit = min(max_frames or MAX_FRAMES, MAX_FRAMES)
    frames: collections.deque = collections.deque(maxlen=keep)
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            if not streams:
                raise VideoError(f"{path} has no video stream")
            stream = streams[0]
            if stream.codec_context is None:
                raise VideoError(f"{path}: its video stream has no decoder here (unsupported codec)")
            _check_size(stream.codec_context.width, stream.codec_context.height, path)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            count = 0
            for frame in container.decode(stream):
                _check_size(frame.width, frame.height, path)
                frames.append(frame.to_ndarray(format="rgb24"))
                count += 1
                if count >= limit:
                    break
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, RuntimeError, AttributeError, TypeError, EOFError) as err:
        if frames:  # a truncated file: keep what decoded
            return list(frames), fps or 30.0
        raise VideoError(f"cannot decode {path}: {str(err).strip() or type(err).__name__}; is it a video file?") from None
    return list(frames), (fps if 0 < fps < 1000 else 30.0)


def read_video(path, last: int | None = None, max_frames: int | None = None) -> Clip:
    """Decode a video file (MP4, WebM, MKV, MOV, GIF, ...) or a folder of images, as RGB uint8.

    `last` keeps only the last N frames (streamed: a long video does not fill memory)."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path} does not exist")
    if last is not None and last < 1:
        raise ConfigError(f"the number of frames to keep must be >= 1, got {last}")
    if path.is_dir():
        images = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not images:
            raise VideoError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if max_frames:
            images = images[:max_frames]
        if last:
            images = images[-last:]
        frames = [_decode(image, 1, 1)[0][0] for image in images]
        if len({f.shape for f in frames}) > 1:
            raise VideoError(f"the images in {path} have different sizes; resize them to one size")
        return Clip(np.stack(frames), 30.0)
    frames, fps = _decode(path, last, max_frames)
    if not frames:
        raise VideoError(f"{path} holds no frames")
    return Clip(np.stack(frames), fps)


def _resize(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if x.shape[-2:] == (height, width):
        return x
    antialias = height < x.shape[-2] or width < x.shape[-1]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)


def fit_frames(frames: np.ndarray, size: tuple[int, int], mode: str = "crop") -> np.ndarray:
    """Fit (N, H, W, 3) uint8 frames to size (h, w). crop: cover then center-crop (default);
    pad: fit inside then pad black, centered; stretch: ignore the aspect ratio."""
    if mode not in FIT_MODES:
        raise ConfigError(f"unknown fit mode {mode!r}: use {', '.join(FIT_MODES)}")
    h, w = size
    n, src_h, src_w = frames.shape[:3]
    if mode == "stretch":
        out = _resize(frames, h, w)
    else:
        scale = (max if mode == "crop" else min)(h / src_h, w / src_w)
        rh, rw = max(1, round(src_h * scale)), max(1, round(src_w * scale))
        resized = _resize(frames, rh, rw)
        if mode == "crop":
            top, left = (rh - h) // 2, (rw - w) // 2
            out = resized[:, :, top:top + h, left:left + w]
        else:
            out = torch.zeros((n, 3, h, w))
            top, left = (h - rh) // 2, (w - rw) // 2
            out[:, :, top:top + rh, left:left + rw] = resized
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(tensor: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def upscale_frames(frames: np.ndarray, factor: int, mode: str = "nearest") -> np.ndarray:
    """Enlarge (N, H, W, 3) uint8 frames `factor` times for viewing."""
    if factor == 1:
        return frames
    if mode == "nearest":
        return frames.repeat(factor, axis=1).repeat(factor, axis=2)
    if mode != "bicubic":
        raise ConfigError(f"unknown upscale mode {mode!r}: use nearest or bicubic")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class VideoWriter:
    """H.264 MP4 written frame by frame; every written frame survives a crash (fragmented MP4).

    Odd sizes are padded to even (black) as yuv420p requires."""

    def __init__(self, path, fps: float, upscale: int = 1, upscale_mode: str = "nearest"):
        self.path = Path(path)
        if not fps > 0:
            raise ConfigError(f"fps must be > 0, got {fps}")
        if upscale_mode not in ("nearest", "bicubic"):
            raise ConfigError(f"unknown upscale mode {upscale_mode!r}: use nearest or bicubic")
        parent = self.path.parent
        if not parent.is_dir():
            raise VideoError(f"cannot write {self.path}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise VideoError(f"cannot write {self.path}: the folder {parent} is not writable")
        if self.path.is_dir():
            raise VideoError(f"cannot write {self.path}: it is a folder")
        self.fps, self.upscale, self.upscale_mode = fps, upscale, upscale_mode
        self.frames_written = 0
        self._container = None
        self._stream = None
        self._file = None

    def _open(self, height: int, width: int) -> None:
        try:
            self._file = open(self.path, "wb")
            self._container = av.open(self._file, mode="w", format="mp4",
                                      options={"movflags": "frag_keyframe+empty_moov+default_base_moof"})
            from fractions import Fraction

            rate = Fraction(self.fps).limit_denominator(1001)
            self._stream = self._container.add_stream("libx264", rate=rate)
            self._stream.width, self._stream.height = width + width % 2, height + height % 2
            self._stream.pix_fmt = "yuv420p"
            # every frame a keyframe in its own fragment, no lookahead: nothing is held back
            self._stream.options = {"tune": "zerolatency", "g": "1", "crf": "12", "preset": "veryfast"}
        except (OSError, av.FFmpegError, ValueError) as err:
            raise VideoError(f"cannot write {self.path}: {getattr(err, 'strerror', None) or err}") from None

    def write(self, frame: np.ndarray) -> None:
        """Encode one (H, W, 3) uint8 frame and flush it to disk."""
        frame = upscale_frames(frame[None], self.upscale, self.upscale_mode)[0]
        h, w = frame.shape[:2]
        if self._container is None:
            self._open(h, w)
        if (h + h % 2, w + w % 2) != (self._stream.height, self._stream.width):
            raise VideoError(f"frame size {w}x{h} differs from the first frame's in {self.path}")
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))
        try:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
            self._file.flush()
        except (OSError, av.FFmpegError) as err:
            raise VideoError(f"cannot write {self.path}: {getattr(err, 'strerror', None) or err} (disk full?)") from None
        self.frames_written += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
        except (OSError, av.FFmpegError) as err:
            raise VideoError(f"cannot finish {self.path}: {getattr(err, 'strerror', None) or err}") from None
        finally:
            self._file.close()
            self._container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(path, frames: np.ndarray, fps: float) -> Path:
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
    return Path(path)


def write_png_frames(directory, frames: np.ndarray, start_index: int = 0) -> list[Path]:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, frame in enumerate(frames):
            path = directory / f"frame_{start_index + i:06d}.png"
            av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").to_image().save(path)
            paths.append(path)
    except OSError as err:
        raise VideoError(f"cannot write frames to {directory}: {err.strerror or err}") from None
    return paths
