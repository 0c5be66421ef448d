"""scd.mp4, the streaming MP4 writer, on real files: round trips, FFmpeg's own fragments as the
reference, `kill -9` mid-run (ours keeps every frame; FFmpeg's fragmenting one fewer), the duration
in the header (PyAV and a real Chromium), and output safety (never touches what it did not make)."""

import functools
import http.server
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from test_video import BLUE, GREEN, assert_levels, assert_pattern, pattern, run_python

from scd.errors import ConfigError, OutputError, VideoError
from scd.mp4 import VideoWriter, write_video
from scd.video import read_video


def test_write_video_round_trip(tmp_path):
    path = write_video(tmp_path / "out.mp4", pattern(8), fps=7.5)
    clip = read_video(path)
    assert clip.frames.shape == (8, 24, 32, 3) and clip.fps == pytest.approx(7.5)
    assert_pattern(clip.frames, 6)


def test_odd_sizes_are_padded_to_even_and_upscale_applies(tmp_path):
    frame = np.zeros((25, 33, 3), np.uint8)
    frame[:, :16] = GREEN
    frame[:, 16:] = BLUE
    with VideoWriter(tmp_path / "odd.mp4", fps=10) as writer:
        writer.write(frame)
        writer.write(frame)
        assert writer.frames_written == 2
    out = read_video(tmp_path / "odd.mp4").frames
    assert out.shape == (2, 26, 34, 3)
    assert np.abs(out[0, 12, 8].astype(int) - GREEN).max() <= 6
    assert np.abs(out[0, 25, 33].astype(int) - BLUE).max() <= 12  # padding repeats the edge
    with VideoWriter(tmp_path / "big.mp4", fps=10, upscale=3, upscale_mode="bicubic") as writer:
        writer.write(frame)
    assert read_video(tmp_path / "big.mp4").frames.shape == (1, 76, 100, 3)


def boxes(path):
    data, offset, out = Path(path).read_bytes(), 0, []
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        out.append((kind, data[offset:offset + size]))
        offset += size
    return out


def ffmpeg_fragmented(path, frames, fps, kill_after=None):
    """FFmpeg's own fragment-per-frame MP4 (the reference), optionally killed after `kill_after` frames."""
    code = f"""
import os, signal, sys
import av, numpy as np
frames = np.load(sys.argv[2])
with av.open(sys.argv[1], "w", format="mp4",
             container_options={{"movflags": "empty_moov+default_base_moof+frag_every_frame", "flush_packets": "1"}}) as container:
    stream = container.add_stream("libx264", rate={fps})
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    stream.options = {{"tune": "zerolatency", "preset": "veryfast", "crf": "12", "g": "{2 * fps}"}}
    for i, frame in enumerate(frames):
        picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
        picture.pts = i
        container.mux(stream.encode(picture))
        if i + 1 == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)
    container.mux(stream.encode())
"""
    np.save(Path(path).with_suffix(".npy"), frames)
    return run_python(code, path, Path(path).with_suffix(".npy"))


def test_fragments_are_byte_identical_to_ffmpegs_own_fragmented_mp4(tmp_path):
    rng = np.random.default_rng(1)
    frames = np.stack([np.clip(rng.normal(128, 40, (24, 32, 3)) + 8 * i, 0, 255).astype(np.uint8) for i in range(12)])
    reference = tmp_path / "ffmpeg.mp4"
    assert ffmpeg_fragmented(reference, frames, 10).returncode == 0
    ours = write_video(tmp_path / "ours.mp4", frames, fps=10)
    theirs, mine = boxes(reference), boxes(ours)
    assert [kind for kind, _ in mine] == [b"ftyp", b"moov"] + [b"moof", b"mdat"] * 12 + [b"mfra"]
    assert mine[0] == theirs[0] and mine[2:-1] == theirs[2:-1]  # ftyp and every fragment
    # the header is FFmpeg's plus a movie-extends header (mehd) and the durations, written on close
    assert len(mine[1][1]) == len(theirs[1][1]) + 20 and b"mehd" in mine[1][1] and b"mehd" not in theirs[1][1]


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from scd.mp4 import VideoWriter
path, kill_after = sys.argv[1], int(sys.argv[2])
writer = VideoWriter(path, fps=10)
for i in range(8):
    writer.write(np.full((16, 16, 3), 10 + 20 * i, np.uint8))
    if writer.frames_written == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_run_leaves_every_written_frame_playable(tmp_path):
    path = tmp_path / "killed.mp4"
    proc = run_python(KILLED_WRITER, path, 5)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert b"mfra" not in path.read_bytes()  # close() never ran
    clip = read_video(path)
    assert_levels(clip.frames, [10, 30, 50, 70, 90])  # all five, the last one included
    assert clip.fps == 10
    # the kill left the lock file, but the kernel released its lock: the next run writes
    assert sorted(p.name for p in tmp_path.iterdir()) == [".killed.mp4.lock", "killed.mp4"]
    write_video(path, np.zeros((2, 8, 8, 3), np.uint8), fps=10)
    assert read_video(path).frames.shape[0] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["killed.mp4"]


def test_ffmpegs_own_fragmenting_keeps_one_frame_fewer_after_kill_9(tmp_path):
    """Why scd.mp4 writes its fragments itself: FFmpeg closes a fragment only when the next frame
    arrives, and PyAV has no muxer flush. If this starts keeping all five, use FFmpeg's."""
    path = tmp_path / "ffmpeg-killed.mp4"
    frames = np.stack([np.full((16, 16, 3), 10 + 20 * i, np.uint8) for i in range(8)])
    assert ffmpeg_fragmented(path, frames, 10, kill_after=5).returncode == -signal.SIGKILL
    assert_levels(read_video(path).frames, [10, 30, 50, 70])


def test_the_header_carries_the_real_duration(tmp_path):
    path = write_video(tmp_path / "d.mp4", np.zeros((24, 8, 8, 3), np.uint8), fps=8)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert float(stream.duration * stream.time_base) == 3.0
    header = dict(boxes(path))[b"moov"]
    mvhd = header[header.index(b"mvhd") - 4:]
    scale, duration = struct.unpack(">II", mvhd[20:28])
    assert duration / scale == 3.0  # players that trust the movie header (not only FFmpeg's scan) see 3 s


class _Results(http.server.SimpleHTTPRequestHandler):
    def do_POST(self):
        self.server.results.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


PLAYER = """<html><body><script>
const v = document.createElement('video'), out = {};
const report = (r) => fetch('/result', {method: 'POST', body: JSON.stringify(r)});
const count = (now, meta) => { out.presented = meta.presentedFrames; v.requestVideoFrameCallback(count); };
v.requestVideoFrameCallback(count);
v.muted = true;
v.onloadedmetadata = () => { out.duration = v.duration; v.playbackRate = 2; v.play(); };
v.onended = () => { out.decoded = v.getVideoPlaybackQuality().totalVideoFrames; out.ended_at = v.currentTime; report(out); };
v.onerror = () => report({error: v.error.code});
v.src = 'video.mp4';
document.body.appendChild(v);
</script></body></html>"""


def chromium_plays(folder: Path) -> dict:
    """Load folder/video.mp4 in a <video> element of a headless Chromium, play it to the end, and
    return {duration, presented, decoded} as the browser saw them."""
    (folder / "index.html").write_text(PLAYER)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Results, directory=str(folder)))
    server.results = queue.Queue()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = subprocess.Popen([shutil.which("chromium") or shutil.which("chromium-browser"), "--headless",
                                "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
                                f"--user-data-dir={folder / 'profile'}",
                                f"http://127.0.0.1:{server.server_port}/index.html"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return server.results.get(timeout=60)
    finally:
        browser.kill()
        browser.wait()
        server.shutdown()


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="needs Chromium")
def test_chromium_plays_every_frame_and_shows_the_duration(tmp_path):
    write_video(tmp_path / "video.mp4", np.stack([np.full((16, 16, 3), 8 * i, np.uint8) for i in range(16)]), fps=8)
    seen = chromium_plays(tmp_path)
    # every frame decoded; a loaded machine may skip presenting some, so those are only counted
    assert seen["duration"] == 2 and seen["ended_at"] == 2 and seen["decoded"] == 16, seen
    assert 1 <= seen["presented"] <= 16, seen


# ----------------------------------------------------------------------------- outputs


def test_writer_refuses_bad_folders_at_construction(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4", fps=10)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        VideoWriter(tmp_path / "file" / "out.mp4", fps=10)
    if os.geteuid() == 0:  # root writes anywhere but a read-only file system such as /sys
        locked = Path("/sys")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="ermission denied|ead-only"):
        VideoWriter(locked / "out.mp4", fps=10)


@pytest.mark.parametrize("name", ["x.gif", "x.avi", "x.webm", "noext"])
def test_other_containers_are_refused_by_name(tmp_path, name):
    with pytest.raises(OutputError, match=r"\.mp4"):
        VideoWriter(tmp_path / name, fps=10)
    assert list(tmp_path.iterdir()) == []


FULL_DISK = """
import resource, signal, sys
import numpy as np
from scd.mp4 import VideoWriter
from scd.errors import VideoError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
writer = VideoWriter(sys.argv[1], fps=10)
try:
    for i in range(100):
        writer.write(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8))
except VideoError as err:
    print(writer.frames_written, err)
writer.close()  # after the failure: quiet
"""


def test_a_full_disk_is_a_video_error_and_keeps_the_finished_frames(tmp_path):
    proc = run_python(FULL_DISK, tmp_path / "out.mp4")
    assert proc.returncode == 0, proc.stderr
    written, message = proc.stdout.split(" ", 1)
    assert "disk full" in message and int(written) >= 1
    assert read_video(tmp_path / "out.mp4").frames.shape[0] == int(written)


@pytest.mark.parametrize("fps", [0, -5, float("nan"), float("inf")])
def test_writer_refuses_bad_fps(tmp_path, fps):
    with pytest.raises(ConfigError, match="fps"):
        VideoWriter(tmp_path / "out.mp4", fps=fps)
    assert not (tmp_path / "out.mp4").exists()


def test_writer_closed_without_frames_leaves_what_was_there(tmp_path):
    with VideoWriter(tmp_path / "none.mp4", fps=10):
        pass
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.mp4").write_bytes(b"the user's file")
    with VideoWriter(tmp_path / "old.mp4", fps=10):
        assert (tmp_path / "old.mp4").read_bytes() == b"the user's file"  # until the first frame is in
    assert (tmp_path / "old.mp4").read_bytes() == b"the user's file"
    writer = VideoWriter(tmp_path / "one.mp4", fps=10)
    writer.write(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="unlike the first frame"):
        writer.write(np.zeros((10, 8, 3), np.uint8))
    writer.close()
    writer.close()
    with pytest.raises(VideoError, match="closed"):
        writer.write(np.zeros((8, 8, 3), np.uint8))
    assert read_video(tmp_path / "one.mp4").frames.shape == (1, 8, 8, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.mp4", "one.mp4"]


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_devices_and_symlinks_to_them_are_refused_and_kept(tmp_path, device):
    if not Path(device).exists():
        pytest.skip(f"needs {device}")
    link = tmp_path / "out.mp4"
    link.symlink_to(device)
    with pytest.raises(OutputError, match="not a regular file"):
        VideoWriter(link, fps=10)
    assert link.is_symlink() and Path(device).exists() and Path(device).is_char_device()


def test_a_symlinked_output_writes_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real.mp4"
    target.write_bytes(b"old")
    (tmp_path / "link.mp4").symlink_to(target)
    write_video(tmp_path / "link.mp4", np.zeros((2, 8, 8, 3), np.uint8), fps=10)
    assert (tmp_path / "link.mp4").is_symlink()
    assert read_video(target).frames.shape[0] == 2


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    first = VideoWriter(tmp_path / "out.mp4", fps=10)
    with pytest.raises(OutputError, match="another scd run"):
        VideoWriter(tmp_path / "out.mp4", fps=10)
    first.write(np.zeros((8, 8, 3), np.uint8))
    first.close()
    write_video(tmp_path / "out.mp4", np.zeros((3, 8, 8, 3), np.uint8), fps=10)  # free again once closed
    assert read_video(tmp_path / "out.mp4").frames.shape[0] == 3


def test_new_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_video(tmp_path / "u.mp4", np.zeros((1, 8, 8, 3), np.uint8), fps=10)
    finally:
        os.umask(old)
    assert (tmp_path / "u.mp4").stat().st_mode & 0o777 == 0o640


def test_the_atomic_writer_never_replaces_a_device_or_a_folder(tmp_path):
    from scd import files

    (tmp_path / "folder").mkdir()
    for target in ([Path("/dev/null")] if Path("/dev/null").is_char_device() else []) + [tmp_path / "folder"]:
        with pytest.raises(OutputError, match="not a regular file"):
            files.write_text(target, "x")
        assert target.exists() and not target.is_file()
    (tmp_path / "link").symlink_to(tmp_path / "real.txt")
    files.write_text(tmp_path / "link", "through the link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real.txt").read_text() == "through the link"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "link", "real.txt"]
