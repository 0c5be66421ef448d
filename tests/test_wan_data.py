"""Post-training a Wan-family model on captioned clips (issue 24): `scd encode --model WAN_FOLDER`
stores Wan VAE latents and each caption's umT5 embedding; `scd train --init WAN_FOLDER --data
DATASET` trains it under teacher forcing, resumes bit-identically, on two processes too, and the
folder it writes generates from a prompt."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import accelerate_launch, finished
from typer.testing import CliRunner
from wan_base import make_wan_base, write_generator

from scd import dataset, text
from scd.mp4 import write_video
from scd_cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A tiny base, a causal Wan folder and an SCD-Wan folder converted from it, and three captioned
    videos (two with NAME.txt, one without)."""
    root = tmp_path_factory.mktemp("wandata")
    base = make_wan_base(root / "base")
    write_generator(root / "generator.pt", base, std=0.2)
    assert run("convert", root / "generator.pt", "--base", base, "--to", "baseline", "--out", root / "causal",
               "-q").exit_code == 0
    r = run("convert", root / "causal", "--to", "scd", "--encoder-blocks", "0-1", "--decoder-blocks", "0,1",
            "--out", root / "scd", "-q")
    assert r.exit_code == 0, r.output
    videos = root / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red fox running", "the cat walking in the grass", None]):
        frames = rng.integers(0, 255, (13 + 4 * i, 32, 48, 3), dtype=np.uint8)
        write_video(videos / f"v{i}.mp4", frames, fps=8)
        if caption:
            (videos / f"v{i}.txt").write_text(caption + "\n")
    return root, base, videos


def test_encode_stores_latents_and_the_captions_embedding(wan, tmp_path):
    root, base, videos = wan
    r = run("encode", videos, "--model", root / "causal", "--out", tmp_path / "ds", "--clip-frames", "5",
            "--frame-size", "32x48", "-q")
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["text_encoder"] == text.encoder_identity(base) and index["clip_frames"] == 5
    assert [s["source"] for s in index["skipped"]] == ["v2.mp4"] and index["skipped"][0]["reason"] == "no caption"
    clips = [c for s in index["shards"] for c in s["clips"]]
    assert [(c["source"], c["first_frame"], c["frames"]) for c in clips] == \
        [("v0.mp4", 0, 2), ("v0.mp4", 5, 2), ("v1.mp4", 0, 2), ("v1.mp4", 5, 2), ("v1.mp4", 10, 2)]
    assert index["done"]["v0.mp4"]["dropped_frames"] == 3  # 13 frames: two clips of 5, 3 left over
    ds = dataset.LatentDataset(tmp_path / "ds")
    latents, embedding = ds.window(2, 0, 2, "text", 0)
    expected = text.encode_prompts(base, "the cat walking in the grass", text_len=ds.text_len, use_cache=False)
    assert torch.equal(embedding, expected.embeddings[0])  # exactly what generation feeds the model
    assert latents.shape == (2, 4, 4, 6)
    # a captions file instead of NAME.txt; a caption missing from it skips that video
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"v0.mp4": "a dog", "v2.mp4": "a bird flying"}))
    r = run("encode", videos, "--model", root / "causal", "--out", tmp_path / "ds2", "--clip-frames", "9",
            "--frame-size", "32x48", "--captions", captions, "-q")
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "ds2" / "index.json").read_text())
    assert sorted(c["source"] for s in index["shards"] for c in s["clips"]) == ["v0.mp4", "v2.mp4", "v2.mp4"]
    assert [s["source"] for s in index["skipped"]] == ["v1.mp4"]


@pytest.mark.parametrize("args, words", [
    (["--clip-frames", "6"], "1 + 4k"),
    (["--captions", "nope.json"], "does not exist"),
])
def test_encode_refuses_bad_input_in_one_line(wan, tmp_path, args, words):
    root, _, videos = wan
    r = run("encode", videos, "--model", root / "causal", "--out", tmp_path / "ds", *args)
    assert r.exit_code == 2 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    listed = tmp_path / "c.json"
    listed.write_text(json.dumps({"v0.mp4": "a fox"}))
    r = run("encode", videos, "--out", tmp_path / "ds3", "--frame-size", "32", "--captions", listed)
    assert r.exit_code == 2 and "text-conditioned model" in r.output, r.output


@pytest.fixture(scope="module")
def encoded(wan, tmp_path_factory):
    root, _, videos = wan
    out = tmp_path_factory.mktemp("encoded") / "ds"
    r = run("encode", videos, "--model", root / "causal", "--out", out, "--clip-frames", "9", "--frame-size", "32x48", "-q")
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("arch", ["causal", "scd"])
def test_train_resumes_bit_identically_and_generates_from_text(wan, encoded, tmp_path, arch):
    root, base, _ = wan
    common = ["train", "--init", root / arch, "--data", encoded, "--batch-size", "2", "--clip-frames", "3",
              "--warmup", "1", "--checkpoint-every", "1", "--workers", "0", "--threads", "1", "-q"]
    r = run(*common, "--out", tmp_path / "a", "--steps", "3")
    assert r.exit_code == 0, r.output
    assert run(*common, "--out", tmp_path / "b", "--steps", "2").exit_code == 0
    r = run(*common, "--out", tmp_path / "b", "--steps", "3", "--resume")
    assert r.exit_code == 0, r.output
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    start = load_file(root / arch / "model.safetensors")
    assert a.keys() == b.keys() == start.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k].to(a[k].dtype)) for k in a)
    assert (tmp_path / "a" / "losses.csv").read_text() == (tmp_path / "b" / "losses.csv").read_text()
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["base"] == str(base.resolve())
    r = run("generate", "--model", tmp_path / "a", "--prompt", "a fox", "--frames", "5", "--size", "32x48",
            "--out", tmp_path / "a.mp4", "-q")
    assert r.exit_code == 0, r.output


def test_train_refuses_mismatched_data(wan, encoded, tmp_path):
    root, _, videos = wan
    r = run("train", "--init", root / "causal", "--data", encoded, "--clip-frames", "2", "--out", tmp_path / "x",
            "--steps", "1", "--workers", "0")
    assert r.exit_code == 2 and "whole number of the model's chunks" in r.output, r.output
    pixels = tmp_path / "pixels"
    list(dataset.encode_folder(videos, pixels, dataset.pixel_encoding((32, 48))))
    r = run("train", "--init", root / "causal", "--data", pixels, "--clip-frames", "3", "--out", tmp_path / "y",
            "--steps", "1", "--workers", "0")
    assert r.exit_code == 2 and "error" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_two_processes_train_a_wan_model(wan, encoded, tmp_path):
    root, _, _ = wan
    args = ["train", "--init", str(root / "scd"), "--data", str(encoded), "--batch-size", "1", "--clip-frames", "3",
            "--warmup", "1", "--workers", "0", "--steps", "2", "--out", str(tmp_path / "two")]
    assert finished(accelerate_launch(*args, cwd=tmp_path)).count("wrote ") == 1
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and state["step"] == 2


def test_the_few_step_stage_distils_a_wan_scd_on_captioned_clips(wan, encoded, tmp_path):
    root, _, _ = wan
    r = run("train", "--distill-from", root / "scd", "--distill-steps", "2", "--data", encoded, "--batch-size", "2",
            "--clip-frames", "3", "--warmup", "1", "--workers", "0", "--steps", "2", "--out", tmp_path / "few", "-q")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "few" / "config.json").read_text())
    assert len(config["denoising_steps"]) == 2 and config["arch"] == "scd"
    state = torch.load(tmp_path / "few" / "checkpoint.pt", weights_only=True)
    assert state["objective"].startswith("trajectory 2 from")
