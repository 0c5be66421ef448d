"""Text to video end to end: `scd generate --model gdhe17/Self-Forcing --prompt ...` through the CLI,
against the local Hub-like server holding tiny random models in the real repos' layout (a
Self-Forcing generator file, the Wan2.1 Diffusers base: tokenizer, umT5, VAE, transformer config),
then offline from the cache; a local generator + base; convert -> folder gives the same frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hub_server import HubServer
from scd.video import read_video
from scd.wan_reference import DEFAULT_BASE, KNOWN_GENERATORS
from scd_cli.app import app
from wan_base import make_wan_base, write_generator

GENERATOR_REPO = "gdhe17/Self-Forcing"
GENERATOR_FILE = KNOWN_GENERATORS[GENERATOR_REPO][0]
SIZE = ["--size", "32x48"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base folder (module-wide: it takes seconds to write) and a random generator for it in
    Self-Forcing's checkpoint format."""
    root = tmp_path_factory.mktemp("wan")
    base = make_wan_base(root / "base")
    write_generator(root / "generator.pt", base)
    return root, base


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def frames_of(path: Path) -> np.ndarray:
    return read_video(path).frames


def run(*args) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def test_local_generator_and_base(tiny, tmp_path):
    root, base = tiny
    out = tmp_path / "fox.mp4"
    r = run("generate", "--model", root / "generator.pt", "--base", base, "--prompt", "a fox running through fresh snow",
            "--frames", 9, *SIZE, "--out", out, "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    frames = frames_of(out)
    assert frames.shape == (9, 32, 48, 3)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] and report["video_frames_generated"] == 9 and report["latent_frames_generated"] == 3
    assert report["chunk_frames"] == 3 and len(report["chunk_latency_ms"]) == 1
    assert report["times"]["text_encode_s"] > 0
    # the same prompt and seed: the same video; another prompt or seed: another
    again = tmp_path / "again.mp4"
    assert run("generate", "--model", root / "generator.pt", "--base", base, "--prompt",
               "a fox running through fresh snow", "--frames", 9, *SIZE, "--out", again, "-q").exit_code == 0
    assert np.array_equal(frames_of(again), frames)
    other = tmp_path / "other.mp4"
    assert run("generate", "--model", root / "generator.pt", "--base", base, "--prompt", "a dog flying over the sea",
               "--frames", 9, *SIZE, "--out", other, "-q").exit_code == 0
    assert np.abs(frames_of(other).astype(int) - frames.astype(int)).max() > 10
    # frames are counted in video frames and rounded up to whole chunks, and the report says so
    r = run("generate", "--model", root / "generator.pt", "--base", base, "--prompt", "a cat", "--frames", 10, *SIZE,
            "--out", tmp_path / "ten.mp4", "--report", tmp_path / "ten.json")
    assert r.exit_code == 0 and "10 frames asked, 21 made" in r.output.replace("\n", " ")
    assert frames_of(tmp_path / "ten.mp4").shape[0] == 21


def test_the_text_encoder_runs_once_per_prompt(tiny, tmp_path, monkeypatch):
    """A second run of the same prompt takes its embeddings from the disk cache."""
    root, base = tiny
    monkeypatch.setenv("SCD_CACHE", str(tmp_path / "cache"))
    for name in ("a.json", "b.json"):
        r = run("generate", "--model", root / "generator.pt", "--base", base, "--prompt", "a bird over the sea",
                "--frames", 1, *SIZE, "--out", tmp_path / "o.mp4", "--report", tmp_path / name, "-q")
        assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a.json").read_text())["text_encoder_loaded"] is True
    assert json.loads((tmp_path / "b.json").read_text())["text_encoder_loaded"] is False


def test_prompt_file_batch_and_prompt_frames(tiny, tmp_path):
    root, base = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox in the snow\n\na horse on the sea\n")
    r = run("generate", "--model", root / "generator.pt", "--base", base, "--prompt-file", prompts, "--batch", 2,
            "--frames", 1, *SIZE, "--out", tmp_path / "b.mp4", "-q")
    assert r.exit_code == 0, r.output
    first, second = frames_of(tmp_path / "b_0.mp4"), frames_of(tmp_path / "b_1.mp4")
    assert first.shape == second.shape == (9, 32, 48, 3) and not np.array_equal(first, second)  # one chunk
    # a clip of 5 frames (1 + 4) becomes two latent frames the stream continues
    from scd.mp4 import write_video

    clip = write_video(tmp_path / "clip.mp4", np.random.default_rng(0).integers(0, 255, (5, 32, 48, 3), np.uint8), fps=16)
    r = run("generate", "--model", root / "generator.pt", "--base", base, "--prompt", "a fox", "--prompt-frames", clip,
            "--frames", 12, *SIZE, "--out", tmp_path / "c.mp4", "--report", tmp_path / "c.json", "-q")
    assert r.exit_code == 0, r.output
    assert frames_of(tmp_path / "c.mp4").shape[0] == 12  # 3 latent frames of 4
    r = run("generate", "--model", root / "generator.pt", "--base", base, "--prompt", "a fox", "--prompt-frames", clip,
            "--frames", 12, *SIZE, "--include-prompt", "--out", tmp_path / "d.mp4", "-q")
    assert r.exit_code == 0 and frames_of(tmp_path / "d.mp4").shape[0] == 5 + 12


@pytest.mark.parametrize("args, words", [
    (["--prompt-file", "missing.txt"], "does not exist"),
    (["--prompt", "x", "--size", "30x48"], "multiples of 16"),
    (["--prompt", "x", "--size", "big"], "HxW"),
    (["--frames", 3], "give --prompt"),
    (["--prompt", "x", "--actions", "up"], "knows none"),
    (["--prompt", "x", "--samples", 2], "draws one sample per frame: use --samples 1"),
])
def test_bad_input_is_one_line(tiny, tmp_path, args, words):
    root, base = tiny
    r = run("generate", "--model", root / "generator.pt", "--base", base, *args, "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o.mp4").exists()


def test_a_base_without_a_vae_is_refused(tiny, tmp_path):
    import shutil

    root, base = tiny
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    shutil.rmtree(broken / "vae")
    r = run("generate", "--model", root / "generator.pt", "--base", broken, "--prompt", "x", *SIZE,
            "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "vae" in r.output and "Traceback" not in r.output


def test_a_generator_whose_sizes_do_not_fit_its_base(tiny, tmp_path):
    root, base = tiny
    data = torch.load(root / "generator.pt", weights_only=True)
    data["generator_ema"]["model.blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    torch.save(data, tmp_path / "bad.pt")
    r = run("generate", "--model", tmp_path / "bad.pt", "--base", base, "--prompt", "x", "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "blocks.0.ffn.0.weight" in r.output


def test_convert_then_generate_gives_the_checkpoints_frames(tiny, tmp_path):
    root, base = tiny
    r = run("convert", root / "generator.pt", "--base", base, "--to", "baseline", "--out", tmp_path / "folder", "-q")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["family"] == "wan" and config["base"] == str(base.resolve())
    common = ["--prompt", "a fox", "--frames", 5, *SIZE, "-q"]
    assert run("generate", "--model", tmp_path / "folder", *common, "--out", tmp_path / "a.mp4").exit_code == 0
    assert run("generate", "--model", root / "generator.pt", "--base", base, *common,
               "--out", tmp_path / "b.mp4").exit_code == 0
    assert np.array_equal(frames_of(tmp_path / "a.mp4"), frames_of(tmp_path / "b.mp4"))


def test_self_forcing_by_name_from_the_hub_then_offline(tiny, tmp_path, hub_env):
    """The issue's one line, against the Hub look-alike: only the files needed are fetched (not the
    base transformer's weights), then it runs again with HF_HUB_OFFLINE=1 from the cache."""
    root, base = tiny
    with HubServer() as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        hub.add_repo(GENERATOR_REPO, {GENERATOR_FILE: (root / "generator.pt").read_bytes(),
                                      "checkpoints/ode_init.pt": b"\0" * 4096, "README.md": b"# Self-Forcing\n"})
        base_files = files_of(base)
        base_files["transformer/diffusion_pytorch_model.safetensors"] = b"\0" * 65536  # never fetched
        hub.add_repo(DEFAULT_BASE, base_files)
        r = run("generate", "--model", GENERATOR_REPO, "--prompt", "a fox running through fresh snow", "--frames", 9,
                *SIZE, "--out", tmp_path / "fox.mp4")
        assert r.exit_code == 0, r.output
        fetched = hub.requested()
        assert GENERATOR_FILE in fetched and "vae/config.json" in fetched and "tokenizer/tokenizer.json" in fetched
        assert "transformer/diffusion_pytorch_model.safetensors" not in fetched
        assert "checkpoints/ode_init.pt" not in fetched
    online = frames_of(tmp_path / "fox.mp4")
    assert online.shape == (9, 32, 48, 3)
    hub_env.setenv("HF_HUB_OFFLINE", "1")
    r = run("generate", "--model", GENERATOR_REPO, "--prompt", "a fox running through fresh snow", "--frames", 9,
            *SIZE, "--out", tmp_path / "offline.mp4")
    assert r.exit_code == 0, r.output
    assert np.array_equal(frames_of(tmp_path / "offline.mp4"), online)
    local = tmp_path / "local.mp4"
    assert run("generate", "--model", root / "generator.pt", "--base", base, "--prompt",
               "a fox running through fresh snow", "--frames", 9, *SIZE, "--out", local, "-q").exit_code == 0
    assert np.array_equal(frames_of(local), online)


def test_download_prefetches_the_generator_and_its_base(tiny, tmp_path, hub_env):
    root, base = tiny
    with HubServer() as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        hub.add_repo(GENERATOR_REPO, {GENERATOR_FILE: (root / "generator.pt").read_bytes()})
        base_files = files_of(base)
        base_files["transformer/diffusion_pytorch_model.safetensors"] = b"\0" * 65536
        hub.add_repo(DEFAULT_BASE, base_files)
        r = run("download", GENERATOR_REPO)
        assert r.exit_code == 0, r.output
        assert GENERATOR_REPO in r.output and DEFAULT_BASE in r.output
        assert "transformer/diffusion_pytorch_model.safetensors" not in hub.requested()
    hub_env.setenv("HF_HUB_OFFLINE", "1")  # the server is gone: everything comes from the cache
    r = run("generate", "--model", GENERATOR_REPO, "--prompt", "a fox", "--frames", 1, *SIZE,
            "--out", tmp_path / "o.mp4", "-q")
    assert r.exit_code == 0, r.output
    assert frames_of(tmp_path / "o.mp4").shape[0] == 9
