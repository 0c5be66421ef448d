"""The streaming MP4 writer: H.264 (yuv420p) in fragmented MP4, one fragment per frame, each in the
file the moment its frame is encoded, so the file plays with every finished frame even after
`kill -9`; on close the real duration goes into the header and a seek index (mfra) at the end.

FFmpeg encodes and writes the header (ftyp + an empty moov); the fragments are written here. FFmpeg's
own fragmenting (`movflags=frag_every_frame`) closes a fragment only when the next frame arrives and
PyAV exposes no muxer flush (`av_write_frame(ctx, NULL)`), so it keeps one frame fewer after a kill:
tests/test_mp4.py checks both, and the fragments written here are byte-identical to FFmpeg's.
"""

from __future__ import annotations

import io
import math
import os
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from scd import files
from scd.errors import ConfigError, OutputError, VideoError
from scd.video import check_upscale, upscale_frames

SUFFIXES = (".mp4", ".m4v")
_TRACK_ID = 1  # FFmpeg numbers the only track 1
_SYNC, _NON_SYNC = 0x02000000, 0x01010000  # sample flags: depends on no other / non-sync sample
_PARENTS = {b"moov", b"trak", b"mdia", b"mvex"}


def check_path(path) -> None:
    """Refuse an output name that promises another container (x.gif, x.avi): scd writes MP4 only."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise OutputError(f"{Path(path).name} does not end in .mp4: scd writes H.264 MP4 video only; name the "
                          "output .mp4 (and convert it with ffmpeg if you need GIF, AVI or another format)")


# ----------------------------------------------------------------------------- boxes


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version << 24 | flags), *payload)


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """(kind, offset, size) of every box in data[start:end], descending into moov, trak, mdia, mvex."""
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        if size < 8:
            return
        yield kind, start, size
        if kind in _PARENTS:
            yield from _boxes(data, start + 8, start + size)
        start += size


def _fragment(sequence: int, decode_time: int, duration: int, sample: bytes, keyframe: bool) -> bytes:
    """moof + mdat holding one sample: tfhd gives the sample's duration, size and non-sync flags (and
    says offsets count from the moof), tfdt its decode time, trun the data offset and, for a
    keyframe, sync flags."""
    tfhd = _full_box(b"tfhd", 0, 0x020038, struct.pack(">IIII", _TRACK_ID, duration, len(sample), _NON_SYNC))
    tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", decode_time))

    def moof(data_offset: int) -> bytes:
        if keyframe:
            trun = _full_box(b"trun", 0, 0x000005, struct.pack(">IiI", 1, data_offset, _SYNC))
        else:
            trun = _full_box(b"trun", 0, 0x000001, struct.pack(">Ii", 1, data_offset))
        return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), _box(b"traf", tfhd, tfdt, trun))

    head = moof(0)
    return moof(len(head) + 8) + _box(b"mdat", sample)


def _random_access_index(keyframes: list[tuple[int, int]]) -> bytes:
    """mfra: (decode time, moof offset) of every keyframe fragment, for players that seek."""
    entries = b"".join(struct.pack(">QQBBB", time, offset, 1, 1, 1) for time, offset in keyframes)
    tfra = _full_box(b"tfra", 1, 0, struct.pack(">III", _TRACK_ID, 0, len(keyframes)), entries)
    mfro_size = 16
    return _box(b"mfra", tfra, _full_box(b"mfro", 0, 0, struct.pack(">I", 8 + len(tfra) + mfro_size)))


def _length_prefixed(annex_b: bytes) -> bytes:
    """H.264 Annex B (start-code separated NAL units) -> 4-byte length prefixes, as MP4 stores them."""
    # emulation prevention keeps 00 00 01 out of NAL units, and none ends in a zero byte
    units = (unit.rstrip(b"\x00") for unit in annex_b.split(b"\x00\x00\x01"))
    return b"".join(struct.pack(">I", len(unit)) + unit for unit in units if unit)


class _Header:
    """FFmpeg's ftyp + empty moov, with a movie-extends header (mehd) added so the whole duration can
    be written in place on close: where each duration field lives and in which time scale."""

    def __init__(self, data: bytes):
        boxes = {kind: (offset, size) for kind, offset, size in _boxes(data)}
        if not {b"moov", b"mvex", b"mvhd", b"tkhd", b"mdhd"} <= set(boxes):
            raise VideoError("FFmpeg wrote an MP4 header without a movie extends box; this FFmpeg is not supported")
        mehd = _full_box(b"mehd", 1, 0, struct.pack(">Q", 0))  # fragment_duration: 0 until close
        buffer = bytearray(data)
        for kind in (b"moov", b"mvex"):
            offset = boxes[kind][0]
            struct.pack_into(">I", buffer, offset, boxes[kind][1] + len(mehd))
        at = boxes[b"mvex"][0] + 8
        self.bytes = bytes(buffer[:at] + mehd + buffer[at:])
        self.fields = {}  # kind -> (offset of the duration field, its width in bytes)
        for kind, offset, _ in _boxes(self.bytes):
            if kind in (b"mvhd", b"tkhd", b"mdhd", b"mehd"):
                version = self.bytes[offset + 8]
                after = {b"mvhd": (24, 32), b"mdhd": (24, 32), b"tkhd": (28, 36), b"mehd": (12, 12)}[kind][version]
                self.fields[kind] = (offset + after, 8 if version else 4)
        self.movie_scale = self._read(b"mvhd", -4)
        self.media_scale = self._read(b"mdhd", -4)

    def _read(self, kind: bytes, shift: int) -> int:
        offset, _ = self.fields[kind]
        return struct.unpack_from(">I", self.bytes, offset + shift)[0]  # the time scale sits just before

    def durations(self, media_duration: int) -> list[tuple[int, bytes]]:
        """(file offset, bytes) writes that record `media_duration` (in the track's time scale)."""
        movie = round(media_duration * self.movie_scale / self.media_scale)
        writes = []
        for kind, value in ((b"mvhd", movie), (b"tkhd", movie), (b"mehd", movie), (b"mdhd", media_duration)):
            offset, width = self.fields[kind]
            writes.append((offset, value.to_bytes(width, "big") if value < 2 ** (8 * width) else b"\xff" * width))
        return writes


# ----------------------------------------------------------------------------- the writer


class VideoWriter:
    """H.264 MP4 written frame by frame: each frame is encoded and written to the file in write(), so
    the file plays with every written frame even if the process is killed; close() writes the
    duration into the header and a seek index.

    Construction checks the output (scd.files.check_output: folder, permissions, not a device, not
    an MP4-less name) and locks it against other runs; raises OutputError. The file takes the place
    of `path` only when its first frame is in: a writer closed (or failing) before that leaves
    whatever was at `path` untouched. Frames are upscaled by `upscale` (nearest or bicubic); an odd
    width or height is padded to even by repeating the last column or row, as yuv420p needs.
    Keyframes every 2 seconds; no B-frames or lookahead, so nothing is held back. Raises ConfigError
    for fps outside (0, 1000] or a bad upscale."""

    def __init__(self, path, fps: float, upscale: int = 1, upscale_mode: str = "nearest", inputs=()):
        if not (math.isfinite(fps) and 0 < fps <= 1000):
            raise ConfigError(f"fps must be > 0 and <= 1000, got {fps}")
        check_upscale(upscale, upscale_mode)
        self.path = Path(path)
        real = files.check_output(path, "video", inputs)
        check_path(path)
        self.fps, self.upscale, self.upscale_mode = fps, int(upscale), upscale_mode
        self.frames_written = 0
        self._rate = Fraction(fps).limit_denominator(1001)
        self._encoder = None  # an in-memory FFmpeg MP4 whose stream encodes; started by the first frame
        self._stream = None
        self._header = None
        self._keyframes: list[tuple[int, int]] = []  # (decode time, file offset) of keyframe fragments
        self._offset = 0
        self._decode_time = 0
        self._lock = files.OutputLock(real, "video").acquire()
        try:
            self._pending = files.PendingFile(real, "video")
        except BaseException:
            self._lock.release()
            raise
        self._file = self._pending.file

    def _start(self, height: int, width: int) -> None:
        header = io.BytesIO()
        self._encoder = av.open(header, "w", format="mp4", container_options={"movflags": "empty_moov+default_base_moof"})
        self._stream = self._encoder.add_stream("libx264", rate=self._rate)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"tune": "zerolatency", "preset": "veryfast", "crf": "12",
                                "g": str(max(1, round(2 * self.fps)))}
        self._encoder.start_encoding()  # ftyp + moov
        self._header = _Header(header.getvalue())
        self._append(self._header.bytes)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view):]
        except OSError as err:
            self._cut_partial()
            self._release()
            raise VideoError(f"cannot write {self.path}: {err.strerror or err}; is the disk full?") from None
        self._offset += len(data)

    def _cut_partial(self) -> None:
        """After a failed write (disk full): end the file on its last whole fragment, so a reader
        finds every finished frame and no box cut short (shrinking a file needs no free space)."""
        try:
            os.ftruncate(self._file.fileno(), self._offset)
        except OSError:
            pass  # the file keeps its partial box; the frames before it still decode

    def _write_packets(self, packets) -> None:
        tick = 1 / self._rate / self._stream.time_base  # one frame in the track's time scale
        for packet in packets:
            index = self.frames_written
            decode_time = round(index * tick)
            if packet.is_keyframe:
                self._keyframes.append((decode_time, self._offset))
            sample = _length_prefixed(bytes(packet))
            duration = round((index + 1) * tick) - decode_time
            self._append(_fragment(index + 1, decode_time, duration, sample, packet.is_keyframe))
            self.frames_written += 1
            self._decode_time = decode_time + duration
            if not self._pending.published:
                self._pending.publish()  # the first frame is in: the file takes its place

    def write(self, frame: np.ndarray) -> None:
        """Encode one uint8 (H, W, 3) RGB frame and write it to the file. Every frame must have the
        size of the first. Raises VideoError when the file cannot be written (disk full)."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"a frame is uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        if self._file.closed:
            raise VideoError(f"{self.path} is closed; no more frames can be written to it")
        frame = upscale_frames(frame[None], self.upscale, self.upscale_mode)[0]
        h, w = frame.shape[:2]
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # (H', W', 3), even
        if self._encoder is None:
            self._start(*frame.shape[:2])
        if frame.shape[:2] != (self._stream.height, self._stream.width):
            raise VideoError(f"frame {self.frames_written} is {w}x{h}, unlike the first frame of {self.path}")
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        picture.pts = self.frames_written  # in 1 / fps
        self._write_packets(self._stream.encode(picture))

    def close(self) -> None:
        """Flush the encoder, add a seek index (mfra) and write the duration into the header; safe
        to call twice."""
        if self._file.closed:
            return
        try:
            if self._encoder is not None:
                self._write_packets(self._stream.encode(None))
                if self.frames_written:
                    self._append(_random_access_index(self._keyframes))
                    for offset, data in self._header.durations(self._decode_time):
                        os.pwrite(self._file.fileno(), data, offset)
        except OSError as err:
            self._cut_partial()
            raise VideoError(f"cannot write {self.path}: {err.strerror or err}; is the disk full?") from None
        finally:
            self._release()

    def _release(self) -> None:
        self._pending.discard()  # closes the file; removes it only if no frame ever made it in
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
        self._lock.release()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path, frames: np.ndarray, fps: float) -> Path:
    """Write uint8 (N, H, W, 3) frames to an H.264 MP4 at `fps`; returns the path."""
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
    return Path(path)
