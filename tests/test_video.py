"""scd.video on real files written here with PyAV: formats in, fit modes, PNG frames out, and every
error a user can cause. The MP4 writer: test_mp4.py."""

import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from fractions import Fraction
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from scd import video
from scd.errors import ConfigError, VideoError
from scd.mp4 import write_video
from scd.video import (
    Clip,
    fit_frames,
    frames_to_tensor,
    read_video,
    tensor_to_frames,
    upscale_frames,
    write_png_frames,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def pattern(n: int, h: int = 24, w: int = 32) -> np.ndarray:
    """(n, h, w, 3): left half red on odd frames and green on even ones, right half blue."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, :, : w // 2] = RED if i % 2 else GREEN
        frames[i, :, w // 2:] = BLUE
    return frames


def ramp(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """(n, h, w, 3) gray frames, frame i at level 10 + 20 i: the index survives lossy coding."""
    return np.stack([np.full((h, w, 3), 10 + 20 * i, np.uint8) for i in range(n)])


def encode(path, frames, fps=10, codec="libx264", pix_fmt="yuv420p", times=None, options=None) -> Path:
    """Write frames with PyAV; `times` (seconds) gives each frame its own timestamp."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = options or {}
        if times is not None:
            stream.time_base = Fraction(1, 1000)
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is None:
                picture.pts = i
            else:
                picture.pts, picture.time_base = round(times[i] * 1000), Fraction(1, 1000)
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return Path(path)


def assert_pattern(frames: np.ndarray, tolerance: int) -> None:
    """Centers of both halves hold the colors `pattern` put there."""
    h, w = frames.shape[1:3]
    for i, frame in enumerate(frames):
        left, right = frame[h // 2, w // 4].astype(int), frame[h // 2, 3 * w // 4].astype(int)
        assert np.abs(left - (RED if i % 2 else GREEN)).max() <= tolerance, (i, left)
        assert np.abs(right - BLUE).max() <= tolerance, (i, right)


def assert_levels(frames: np.ndarray, expected: list[int]) -> None:
    """Each frame's mean gray level, within lossy coding's error; neighbours differ by 20."""
    means = [float(f.mean()) for f in frames]
    assert len(means) == len(expected) and np.allclose(means, expected, atol=3), (means, expected)


def run_python(code: str, *args) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds almost no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name,codec,pix_fmt,fps", [
    ("clip.mp4", "libx264", "yuv420p", 12),
    ("clip.webm", "libvpx-vp9", "yuv420p", 12),
    ("clip.mkv", "libx264", "yuv420p", 25),
    ("clip.mov", "mpeg4", "yuv420p", 24),
    ("clip.gif", "gif", "rgb8", 10),  # 10 fps: GIF delays are whole centiseconds
])
def test_containers_decode_with_count_size_fps_and_colors(tmp_path, name, codec, pix_fmt, fps):
    path = encode(tmp_path / name, pattern(10), fps, codec, pix_fmt)
    clip = read_video(path)
    assert isinstance(clip, Clip)
    assert clip.frames.shape == (10, 24, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(fps)
    assert_pattern(clip.frames, 8)


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_ten_bit_input_comes_out_as_8_bit_rgb(tmp_path, codec):
    try:
        path = encode(tmp_path / f"{codec}.mp4", pattern(4), 10, codec, "yuv420p10le",
                      options={"x265-params": "log-level=none"} if codec == "libx265" else None)
    except (av.FFmpegError, ValueError) as err:
        pytest.skip(f"this FFmpeg cannot encode 10-bit {codec}: {err}")
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).format.name == "yuv420p10le"  # really 10-bit
    clip = read_video(path)
    assert clip.frames.shape == (4, 24, 32, 3) and clip.frames.dtype == np.uint8
    assert_pattern(clip.frames, 8)


def test_variable_frame_rate_keeps_every_frame_in_order_at_the_average_rate(tmp_path):
    times = [0, 0.1, 0.15, 0.4, 0.5, 0.9, 1.0, 1.05, 1.2, 1.5]
    path = encode(tmp_path / "vfr.mp4", ramp(10), times=times)
    clip = read_video(path)
    assert_levels(clip.frames, [10 + 20 * i for i in range(10)])
    with av.open(str(path)) as container:
        assert clip.fps == pytest.approx(float(container.streams.video[0].average_rate))
    assert 5 < clip.fps < 8  # 10 frames over about 1.5 s, not the 10 fps the stream was opened with


def test_last_and_max_frames_pick_the_right_frames(tmp_path):
    path = encode(tmp_path / "ramp.mp4", ramp(12))
    assert_levels(read_video(path, last=3).frames, [190, 210, 230])
    assert_levels(read_video(path, max_frames=2).frames, [10, 30])
    assert_levels(read_video(path, max_frames=5, last=2).frames, [70, 90])
    assert read_video(path, last=50).frames.shape[0] == 12
    with pytest.raises(ConfigError, match="last"):
        read_video(path, last=0)


def test_last_streams_without_holding_the_whole_video(tmp_path):
    path = encode(tmp_path / "long.mp4", np.zeros((120, 64, 64, 3), np.uint8), options={"preset": "ultrafast"})
    peaks = {}
    for last in (2, None):
        tracemalloc.start()
        read_video(path, last=last)
        peaks[last] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    frame_bytes = 64 * 64 * 3
    assert peaks[None] > 120 * frame_bytes  # the measurement sees decoded frames
    assert peaks[2] < 12 * frame_bytes


def test_image_folder_in_natural_order_at_30_fps(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, level in [(10, 30), (2, 20), (1, 10)]:
        iio.imwrite(folder / f"f{index}.png", np.full((6, 8, 3), level, np.uint8))
    iio.imwrite(folder / "f11.jpg", np.full((6, 8, 3), 40, np.uint8))
    (folder / "notes.txt").write_text("not a frame")
    (folder / "._f1.png").write_bytes(b"macOS metadata, not a PNG")
    clip = read_video(folder)
    assert clip.fps == 30.0 and clip.frames.shape == (4, 6, 8, 3)
    assert_levels(clip.frames, [10, 20, 30, 40])
    assert_levels(read_video(folder, last=2).frames, [30, 40])


def test_grayscale_rgba_and_gray_alpha_images(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 100, 50), 128  # half transparent: composited on black
    rgba[:, :4, 3] = 255
    gray_alpha = np.stack([np.full((6, 8), 200, np.uint8), np.full((6, 8), 64, np.uint8)], -1)
    iio.imwrite(tmp_path / "gray.png", gray)
    iio.imwrite(tmp_path / "rgba.png", rgba)
    iio.imwrite(tmp_path / "ya.png", gray_alpha, mode="LA")
    out = read_video(tmp_path / "gray.png").frames[0]
    assert out.shape == (6, 8, 3) and (out == gray[..., None]).all()
    out = read_video(tmp_path / "rgba.png").frames[0]
    assert out.shape == (6, 8, 3)
    assert (out[:, :4] == (200, 100, 50)).all() and (out[:, 4:] == (100, 50, 25)).all()
    assert (read_video(tmp_path / "ya.png").frames[0] == 50).all()


def test_a_size_change_mid_stream_is_scaled_to_the_first_size(tmp_path):
    # two raw H.264 streams back to back: the second's parameter sets switch to 64x48 mid-stream
    parts = []
    for (h, w), level in [((24, 32), 60), ((48, 64), 200)]:
        encode(tmp_path / "part.h264", np.full((3, h, w, 3), level, np.uint8))
        parts.append((tmp_path / "part.h264").read_bytes())
    (tmp_path / "both.h264").write_bytes(b"".join(parts))
    clip = read_video(tmp_path / "both.h264")
    assert clip.frames.shape == (6, 24, 32, 3)
    assert_levels(clip.frames, [60] * 3 + [200] * 3)


# ----------------------------------------------------------------------------- reading errors


def test_missing_path_and_folders_without_images(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no images"):
        read_video(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(VideoError, match="no images"):
        read_video(tmp_path / "text")


def test_random_bytes_and_audio_only_files_are_video_errors(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="noise.mp4"):
        read_video(noise)
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(VideoError, match=r"fake.mp4 is cut short before its first whole frame \(it ends inside an MP4 box\)"):
        read_video(fake)
    wav = tmp_path / "tone.wav"
    with av.open(str(wav), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        samples.sample_rate = 8000
        container.mux(stream.encode(samples))
    with pytest.raises(VideoError, match="no video stream"):
        read_video(wav)


@pytest.mark.parametrize("name,codec", [("empty.mp4", "libx264"), ("empty.mkv", "libx264"), ("empty.webm", "libvpx-vp9")])
def test_a_video_with_no_frames_is_refused(tmp_path, name, codec):
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoError, match="no video|before its first video frame"):
        read_video(path)


def test_truncated_videos(tmp_path):
    # an ordinary MP4 keeps its index (moov) at the end: cut, nothing can be decoded
    plain = encode(tmp_path / "plain.mp4", ramp(6))
    data = plain.read_bytes()
    plain.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="plain.mp4"):
        read_video(plain)
    # the writer's fragmented MP4 cut inside frame 4 keeps frames 0-3
    streamed = write_video(tmp_path / "streamed.mp4", ramp(6), fps=5)
    data = streamed.read_bytes()
    fragments = [i for i in range(len(data)) if data[i:i + 4] == b"moof"]
    streamed.write_bytes(data[: fragments[4] + 50])
    assert_levels(read_video(streamed).frames, [10, 30, 50, 70])


def test_huge_declared_resolution_is_refused_before_decoding(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(png_header(100_000, 100_000))
    with pytest.raises(VideoError, match="pixels"):
        read_video(folder)
    # 9000 x 9000 is under FFmpeg's own limit: without ours FFmpeg allocates 243 MB to probe it
    (tmp_path / "big.png").write_bytes(png_header(9000, 9000))
    with pytest.raises(VideoError, match="pixels"):
        read_video(tmp_path / "big.png")
    y4m = tmp_path / "big.y4m"
    y4m.write_bytes(b"YUV4MPEG2 W9000 H9000 F30:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(1000))
    with pytest.raises(VideoError, match="9000x9000"):
        read_video(y4m)
    # that nothing large was decoded first: test_huge_declared_resolution_allocates_nothing_large (memory, not time)


PROBE_MEMORY = """
import re, sys
from pathlib import Path
from scd.errors import VideoError
from scd.video import read_video

def peak_kib():  # this process's own high-water mark (ru_maxrss would include the parent's)
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

before = peak_kib()
try:
    read_video(sys.argv[1])
except VideoError:
    print(peak_kib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_huge_declared_resolution_allocates_nothing_large(tmp_path):
    # FFmpeg decodes a frame while probing a file: without a pixel limit it fills 243 MB for this header
    (tmp_path / "big.png").write_bytes(png_header(9000, 9000))
    proc = run_python(PROBE_MEMORY, tmp_path / "big.png")
    assert int(proc.stdout) < 50_000, proc.stderr


def test_mixed_image_sizes_name_both_files(tmp_path):
    iio.imwrite(tmp_path / "a1.png", np.zeros((6, 8, 3), np.uint8))
    iio.imwrite(tmp_path / "a2.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(VideoError, match=r"a2.png is 8x8 but a1.png is 8x6"):
        read_video(tmp_path)


def test_more_than_max_frames_is_refused_unless_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "MAX_FRAMES", 5)
    path = encode(tmp_path / "ramp.mp4", ramp(8))
    with pytest.raises(VideoError, match="more than 5 frames"):
        read_video(path)
    assert read_video(path, last=3).frames.shape[0] == 3
    assert read_video(path, max_frames=4).frames.shape[0] == 4
    write_png_frames(tmp_path / "pngs", ramp(8))
    with pytest.raises(VideoError, match="more than 5 frames"):
        read_video(tmp_path / "pngs")


# ----------------------------------------------------------------------------- pixels


def stripes() -> np.ndarray:
    """(1, 40, 80, 3): red columns 0-19, green 20-59, blue 60-79."""
    frame = np.zeros((1, 40, 80, 3), np.uint8)
    frame[:, :, :20], frame[:, :, 20:60], frame[:, :, 60:] = RED, GREEN, BLUE
    return frame


def test_fit_crop_keeps_the_center():
    out = fit_frames(stripes(), (20, 20))  # crop is the default: 40x80 -> 20x40, columns 10-29 kept
    assert out.shape == (1, 20, 20, 3) and out.dtype == np.uint8
    assert (out[:, :, 1:-1] == GREEN).all()  # the outer columns blend (antialiasing) with red and blue
    assert out[0, 0, 0, 0] > 0 and out[0, 0, -1, 2] > 0


def test_fit_pad_centers_on_black():
    out = fit_frames(stripes(), (40, 40), "pad")[0]  # 40x80 -> 20x40 in rows 10-29
    assert out.shape == (40, 40, 3)
    assert (out[:10] == 0).all() and (out[30:] == 0).all()
    assert (out[15, 2] == RED).all() and (out[15, 20] == GREEN).all() and (out[15, 37] == BLUE).all()


def test_fit_stretch_ignores_the_aspect_ratio():
    out = fit_frames(stripes(), (40, 40), "stretch")[0]
    assert out.shape == (40, 40, 3)
    assert (out[:, :9] == RED).all() and (out[:, 11:29] == GREEN).all() and (out[:, 31:] == BLUE).all()


def test_fit_many_frames_and_an_unknown_mode():
    frames = np.repeat(stripes(), 40, axis=0)  # more than one chunk
    assert fit_frames(frames, (8, 12), "pad").shape == (40, 8, 12, 3)
    assert (fit_frames(frames[:5], (40, 80)) == frames[:5]).all()  # same size: unchanged
    with pytest.raises(ConfigError, match="squash"):
        fit_frames(frames, (8, 8), "squash")


def test_tensor_round_trip_is_exact_and_clamps():
    frames = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    tensor = frames_to_tensor(frames)
    assert tensor.shape == (1, 3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() == -1 and tensor.max() == 1
    assert (tensor_to_frames(tensor) == frames).all()
    assert tensor_to_frames(torch.tensor([-3.0, 0.0, 0.999, 5.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4))[0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_upscale_nearest_and_bicubic():
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 3), dtype=np.uint8)
    big = upscale_frames(frames, 3)
    assert big.shape == (2, 9, 15, 3) and (big[:, ::3, ::3] == frames).all() and (big[:, 2::3, 2::3] == frames).all()
    flat = upscale_frames(np.full((1, 4, 4, 3), 77, np.uint8), 2, "bicubic")
    assert flat.shape == (1, 8, 8, 3) and (flat == 77).all()
    assert upscale_frames(frames, 1) is frames
    with pytest.raises(ConfigError, match="lanczos"):
        upscale_frames(frames, 2, "lanczos")
    with pytest.raises(ConfigError, match="factor"):
        upscale_frames(frames, 0)


# ----------------------------------------------------------------------------- PNG frames (MP4: test_mp4.py)


def test_png_frames_round_trip_exactly(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    paths = write_png_frames(tmp_path / "new" / "pngs", frames, start_index=9)
    assert [p.name for p in paths] == ["frame_000009.png", "frame_000010.png", "frame_000011.png"]
    assert (read_video(tmp_path / "new" / "pngs").frames == frames).all()
    (tmp_path / "file").write_text("x")
    with pytest.raises(VideoError, match="cannot write frames"):
        write_png_frames(tmp_path / "file" / "pngs", frames)
