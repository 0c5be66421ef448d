"""Faults and hostile inputs: interrupted runs keep their work, checkpoints never run code,
corrupt files are one-line errors."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_model, tiny_config
from scd.checkpoints import load_model_folder, read_tensors, save_model_folder
from scd.errors import ActionError, CheckpointError, VideoError
from scd.generate import parse_actions
from scd.video import read_video, write_video


def test_ctrl_c_mid_generation_keeps_a_playable_video_and_an_incomplete_report(tmp_path):
    model = save_model_folder(random_model(tiny_config(latent_size=(8, 8), frame_size=(8, 8))), tmp_path / "m")
    prompt = write_video(tmp_path / "p.mp4", np.full((3, 8, 8, 3), 100, np.uint8), fps=4)
    out, report = tmp_path / "out.mp4", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "scd_cli", "generate", "--model", str(model), "--prompt-frames", str(prompt),
           "--frames", "5000", "--steps", "20", "--out", str(out), "--report", str(report)]
    # a shell running this suite in the background ignores SIGINT for its children: undo that, as a terminal would
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = 0
    for line in proc.stdout:
        if line.startswith("frame "):
            seen += 1
            if seen == 5:
                proc.send_signal(signal.SIGINT)
                break
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest
    data = json.loads(report.read_text())
    assert data["complete"] is False and data["frames_generated"] >= 5
    assert read_video(out).frames.shape[0] == data["frames_generated"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/scd-pwned",))


def test_malicious_pickle_runs_nothing(tmp_path):
    Path("/tmp/scd-pwned").unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x_embedder.weight": Exploit()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_tensors(path)
    assert not Path("/tmp/scd-pwned").exists()


def test_corrupt_safetensors_are_refused_before_use(tmp_path):
    folder = save_model_folder(random_model(tiny_config()), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_folder(folder)
    weights.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header"):
        load_model_folder(folder)
    weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(CheckpointError):
        load_model_folder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_model_folder(folder)


def test_wrong_checkpoint_names_the_tensors(tmp_path):
    folder = save_model_folder(random_model(tiny_config()), tmp_path / "m")
    other = save_model_folder(random_model(tiny_config(num_heads=4, head_dim=4, rope_axes=(0, 2, 2))), tmp_path / "o")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_model_folder(folder)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_random_bytes_as_video_are_a_video_error(tmp_path, data):
    path = tmp_path / "fuzz.mp4"
    path.write_bytes(data)
    try:
        clip = read_video(path)
    except VideoError:
        return
    assert clip.frames.ndim == 4 and clip.frames.shape[-1] == 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10_000))
def test_truncated_video_keeps_decodable_frames_or_errors(tmp_path, cut):
    frames = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    path = write_video(tmp_path / "v.mp4", frames, fps=5)
    data = path.read_bytes()
    path.write_bytes(data[: cut % len(data)])
    try:
        clip = read_video(path)
    except VideoError:
        return
    assert 1 <= clip.frames.shape[0] <= 6


@given(st.text(max_size=200))
def test_action_parser_never_crashes(text):
    try:
        actions = parse_actions(text.replace("/", ""), ("up", "down", "left", "right"), 4)
    except ActionError:
        return
    assert all(0 <= a <= 4 for a in actions)


def test_huge_declared_resolution_is_refused_quickly(tmp_path):
    # a PNG header claiming 100000 x 100000 pixels, with no pixel data behind it
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(png)
    with pytest.raises(VideoError):
        read_video(folder)
