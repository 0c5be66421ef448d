"""`scd generate` end to end: real video files in, decoded MP4s and reports out, one-line errors."""

import json

import av
import numpy as np
import pytest
from conftest import random_model, tiny_config
from typer.testing import CliRunner

from scd.checkpoints import save_model_folder
from scd.mp4 import write_video
from scd.video import read_video
from scd_cli.app import app

runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path):
    config = tiny_config(latent_size=(8, 8), frame_size=(8, 8), fps=5.0)
    return save_model_folder(random_model(config), tmp_path / "model")


@pytest.fixture
def prompt(tmp_path):
    """A 16x16 clip of 6 frames: a bright square moving right over a dark background."""
    frames = np.full((6, 16, 16, 3), 30, dtype=np.uint8)
    for i in range(6):
        frames[i, 4:10, 2 * i:2 * i + 6] = (220, 180, 40)
    path = tmp_path / "prompt.mp4"
    write_video(path, frames, fps=5)
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_generate_writes_a_streamed_mp4_and_report(model_dir, prompt, tmp_path):
    out, report = tmp_path / "out.mp4", tmp_path / "report.json"
    r = run("generate", "--model", model_dir, "--prompt-frames", prompt, "--frames", 4, "--out", out,
            "--report", report, "--actions", "up,down,left,2", "--seed", 3)
    assert r.exit_code == 0, r.output
    clip = read_video(out)
    assert clip.frames.shape == (4, 8, 8, 3)
    assert abs(clip.fps - 5.0) < 1e-6
    data = json.loads(report.read_text())
    assert data["complete"] is True
    assert [f["index"] for f in data["frames"]] == [0, 1, 2, 3]
    for key in ("latency_ms", "context_ms", "denoise_ms"):
        assert all(f[key] >= 0 for f in data["frames"])
    for key in ("time_to_first_frame_ms", "latency_ms_p50", "latency_ms_p95", "frames_per_second"):
        assert data[key] > 0
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["steps"] == 3
    assert data["model"] == str(model_dir)


def test_a_models_own_window_is_the_default(prompt, tmp_path):
    """A model trained on short clips (config `window`, what `scd train` records) keeps that many
    frames of context unless told otherwise: as with --context-window W, unlike a growing cache."""
    config = tiny_config(latent_size=(8, 8), frame_size=(8, 8), context_frames=2, window=2)
    model = save_model_folder(random_model(config), tmp_path / "model")
    videos = {}
    for name, extra in (("own", []), ("given", ["--context-window", 2]), ("growing", ["--context-window", 9])):
        out, report = tmp_path / f"{name}.mp4", tmp_path / f"{name}.json"
        r = run("generate", "--model", model, "--prompt-frames", prompt, "--frames", 6, "--out", out, "--report", report, *extra)
        assert r.exit_code == 0, r.output
        videos[name] = read_video(out).frames
        assert json.loads(report.read_text())["context_window"] == (extra[1] if extra else 2)
    assert np.array_equal(videos["own"], videos["given"]) and not np.array_equal(videos["own"], videos["growing"])


def test_same_seed_same_video_other_seed_differs(model_dir, prompt, tmp_path):
    videos = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / f"{name}.mp4"
        assert run("generate", "--model", model_dir, "--prompt-frames", prompt, "--frames", 3, "--out", out,
                   "--seed", seed, "--upscale", 4).exit_code == 0
        videos.append(read_video(out).frames.astype(int))
    assert videos[0].shape == (3, 32, 32, 3)
    assert np.array_equal(videos[0], videos[1])
    assert np.abs(videos[0] - videos[2]).max() > 10


def test_samples_write_their_median_and_say_so(model_dir, prompt, tmp_path):
    """--samples K writes the per-pixel median of K samples (the same for the same seed, not the
    one-sample video) and the report says how many were drawn."""
    shown = {}
    for name, samples in (("one", 1), ("five", 5), ("again", 5)):
        report = tmp_path / f"{name}.json"
        r = run("generate", "--model", model_dir, "--prompt-frames", prompt, "--frames", 3, "--out", tmp_path / f"{name}.mp4",
                "--samples", samples, "--frames-dir", tmp_path / name, "--report", report, "--upscale", 1)
        assert r.exit_code == 0, r.output
        assert json.loads(report.read_text())["samples"] == samples
        shown[name] = read_video(tmp_path / name).frames.astype(int)  # the PNGs: lossless
    assert shown["five"].shape == (3, 8, 8, 3)
    assert np.array_equal(shown["five"], shown["again"])
    assert np.abs(shown["five"] - shown["one"]).max() > 10
    # a folder that defaults to 5 samples generates what --samples 5 does; --samples 1 overrides it
    config = tiny_config(latent_size=(8, 8), frame_size=(8, 8), fps=5.0, default_samples=5)
    folder = save_model_folder(random_model(config), tmp_path / "five-by-default")
    for name, extra, expected in (("default", (), "five"), ("overridden", ("--samples", 1), "one")):
        r = run("generate", "--model", folder, "--prompt-frames", prompt, "--frames", 3, "--out", tmp_path / f"{name}.mp4",
                "--frames-dir", tmp_path / name, "--upscale", 1, *extra)
        assert r.exit_code == 0, r.output
        assert np.array_equal(read_video(tmp_path / name).frames.astype(int), shown[expected])


def test_include_prompt_batch_and_pngs(model_dir, prompt, tmp_path):
    out = tmp_path / "many.mp4"
    r = run("generate", "--model", model_dir, "--prompt-frames", prompt, "--frames", 2, "--out", out,
            "--batch", 2, "--include-prompt", "--context", 3, "--frames-dir", tmp_path / "png")
    assert r.exit_code == 0, r.output
    for i in range(2):
        assert read_video(tmp_path / f"many_{i}.mp4").frames.shape[0] == 3 + 2
    assert len(list((tmp_path / "png").rglob("*.png"))) == 4


def test_image_folder_prompt_and_fit_modes(model_dir, tmp_path):
    """A 12x20 grey prompt with dark 3-column bands at its left and right edges, fitted to the 8x8
    model: `crop` keeps the centre (the bands are cut off), `pad` keeps all of it in 8x5 on black
    rows, `stretch` squeezes it (the bands stay, thinner). The prompt frames are in the video
    (--include-prompt), through H.264, hence the tolerances."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    image = np.full((12, 20, 3), 200, dtype=np.uint8)
    image[:, :3] = image[:, -3:] = 40
    for i in range(3):
        av.VideoFrame.from_ndarray(image, format="rgb24").to_image().save(folder / f"{i:03d}.png")
    shown = {}
    for fit in ("crop", "pad", "stretch"):
        out = tmp_path / f"{fit}.mp4"
        r = run("generate", "--model", model_dir, "--prompt-frames", folder, "--frames", 1, "--out", out, "--fit", fit,
                "--include-prompt")
        assert r.exit_code == 0, r.output
        frames = read_video(out).frames
        assert frames.shape == (3 + 1, 8, 8, 3)
        shown[fit] = frames[:3].astype(int).mean(-1).mean(0)  # (8, 8) grey of the prompt frames
    crop, pad, stretch = shown["crop"], shown["pad"], shown["stretch"]
    assert np.abs(crop - 200).max() < 30, crop.round()  # the centre 12x12 of the 12x20: no band left
    assert np.abs(pad[[0, 6, 7]]).max() < 16, pad.round()  # 20 -> 8 wide, 12 -> 5 high at rows 1-5: black around
    assert np.abs(pad[2:5, 3:5] - 200).max() < 25 and pad[2:5, [0, 7]].max() < 140, pad.round()  # bands at its sides
    assert np.abs(stretch[:, 3:5] - 200).max() < 25 and stretch[:, [0, 7]].max() < 140, stretch.round()  # all of it


@pytest.mark.parametrize("args, message", [
    (["--prompt-frames", "missing.mp4"], "missing.mp4"),
    (["--actions", "jump"], "unknown action"),
    (["--actions", "up"], "1 actions given for 2 frames"),
    (["--frames", "0"], "frames must be >= 1"),
    (["--fit", "squash"], "squash"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--samples", "0"], "--samples must be >= 1 and <= 64, got 0"),
    (["--device", "cuda:7"], "CUDA"),
    (["--out", "/nonexistent-dir/x.mp4"], "nonexistent-dir"),
])
def test_bad_input_is_one_line_exit_2(model_dir, prompt, tmp_path, args, message):
    base = ["generate", "--model", model_dir, "--prompt-frames", prompt, "--frames", 2, "--out", tmp_path / "o.mp4"]
    # later options override earlier ones
    r = run(*base, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_corrupt_video_and_unknown_model(model_dir, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    r = run("generate", "--model", model_dir, "--prompt-frames", bad, "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = run("generate", "--model", tmp_path / "nope", "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "no model at" in r.output
