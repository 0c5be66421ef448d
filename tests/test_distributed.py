"""`accelerate launch` with two processes on this CPU (torchrun, gloo): training from a latent
dataset runs, only the main process writes, and a resumed run is the straight run."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scd import dataset
from scd.mp4 import write_video


def accelerate_launch(*args, cwd) -> subprocess.Popen:
    """`accelerate launch --multi_gpu --num_processes 2 -m scd_cli.app ...`: on a machine without
    GPUs, accelerate's torchrun launcher with scd's Accelerator(cpu=True) makes a gloo group."""
    with socket.socket() as s:  # a free port: other test runs may hold torchrun's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                             "-m", "scd_cli.app", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(launch: subprocess.Popen) -> str:
    out, err = launch.communicate(timeout=300)
    assert launch.returncode == 0, err[-3000:]
    return out


@pytest.mark.skipif(not hasattr(torch.distributed, "is_gloo_available") or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_train_and_resume_bit_identically(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        frames = np.full((8, 16, 16, 3), 30 + 40 * i, np.uint8)
        for j in range(8):
            frames[j, 4:10, j:j + 6] = (230, 200 - 50 * i, 60)
        write_video(videos / f"v{i}.mp4", frames, fps=8)
    report = list(dataset.encode_folder(videos, tmp_path / "ds", dataset.pixel_encoding((16, 16))))[-1]
    assert report.frames == 24
    tiny = ["train", "--data", str(tmp_path / "ds"), "--heads", "2", "--head-dim", "16", "--layers", "2",
            "--decoder-layers", "1", "--patch-size", "8", "--batch-size", "2", "--clip-frames", "3", "--warmup", "1",
            "--checkpoint-every", "2", "--workers", "0"]
    # the straight run and the first half side by side (their start-up dominates)
    straight = accelerate_launch(*tiny, "--out", str(tmp_path / "a"), "--steps", "4", cwd=tmp_path)
    half = accelerate_launch(*tiny, "--out", str(tmp_path / "b"), "--steps", "2", cwd=tmp_path)
    assert finished(straight).count("wrote ") == 1  # the main process reports and writes
    finished(half)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0], state["rng_ranks"][1])
    # resumed with a DataLoader worker per process: the same windows
    finished(accelerate_launch(*tiny[:-1], "1", "--out", str(tmp_path / "b"), "--steps", "4", "--resume", cwd=tmp_path))
    assert (tmp_path / "a" / "losses.csv").read_text() == (tmp_path / "b" / "losses.csv").read_text()
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
