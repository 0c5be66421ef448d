"""Wan-architecture world models (issue 24's CPU experiment): Wan2.1's blocks conditioned on each
frame's action through its time embedding instead of text, frame by frame with the Euler sampler on
pixels. Their streams equal their teacher-forcing passes, actions steer them, FLOPs are exact, and
the recipe runs end to end through the CLI: train a causal Wan on the world, convert it into
SCD-Wan, post-train it, evaluate and bench the pair."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from conftest import random_model
from scd import new_models, world
from scd.models.wan import block_causal_mask, teacher_forcing_mask
from scd.sampling import Rollout, generate
from scd_cli.app import app


def world_wan(arch="baseline", **overrides):
    config = new_models.new_wan_config(arch, heads=2, head_dim=16, layers=3, decoder_layers=1, patch_size=8,
                                     default_steps=2, context_frames=3)
    return config if not overrides else type(config)(**{**config.to_dict(), **overrides})


def clip(frames=5, seed=3):
    pixels, actions = world.render_clip(seed, frames)
    video = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()[None] / 127.5 - 1
    return video, torch.from_numpy(actions)[None]


def test_the_causal_stream_equals_its_teacher_forcing_pass_with_actions():
    """A frame streamed after three cached frames, each with its own action, is what the masked
    pass over [clean; noisy] computes for it, actions in both."""
    config = world_wan()
    model = random_model(config, 0)
    video, actions = clip(4)
    noisy = torch.randn(1, 1, 3, 32, 32)
    with torch.inference_mode():
        state = model.start(1, 4)
        model.observe(state, video[:, :3], actions[:, :3])
        model.prepare(state, actions[:, 3])
        streamed = model.velocity(state, noisy[:, 0], torch.full((1,), 500.0))
        tokens = torch.cat([video, video], 1)
        tokens[:, 7] = noisy[:, 0]  # the noisy copy of frame 3
        t = torch.tensor([[0.0] * 4 + [1000.0] * 3 + [500.0]])
        mask = teacher_forcing_mask(4, 1, config.tokens_per_frame, "cpu")
        flow = model.run(tokens, t, model.text_kv(None), torch.arange(4).repeat(2), mask=mask,
                         actions=actions.repeat(1, 2))[:, 7]
    assert (streamed - flow).abs().max() < 1e-5


def test_the_scd_stream_equals_its_recomputation_with_actions():
    config = world_wan("scd")
    model = random_model(config, 1)
    video, actions = clip(4)
    noisy = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        state = model.start(1, 4)
        model.observe(state, video[:, :3], actions[:, :3])
        model.prepare(state, actions[:, 3])
        streamed = model.velocity(state, noisy, torch.full((1,), 1000.0))
        frames = torch.cat([video[:, :3], noisy[:, None]], 1)  # the encoder sees the frame being made as noise
        t = torch.tensor([[0.0, 0.0, 0.0, 1000.0]])
        hidden = model.encoder.run(frames, t, model.encoder.text_kv(None), torch.arange(4),
                                   mask=block_causal_mask(4, 1, config.tokens_per_frame, "cpu"),
                                   actions=actions)
        recomputed = model.decode(noisy[:, None], torch.full((1, 1), 1000.0), hidden[:, 3:], model.decoder.text_kv(None),
                                  actions=actions[:, 3:])[:, 0]
    assert (streamed - recomputed).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["baseline", "scd"])
def test_actions_steer_the_stream_and_text_is_refused(arch):
    config = world_wan(arch)
    model = random_model(config, 2)
    video, actions = clip(6)
    other = actions.clone()
    other[:, 4:] = (other[:, 4:] + 1) % 4
    a = generate(model, video[:, :3], 3, 2, conditions=actions, seed=0, window=config.window)
    b = generate(model, video[:, :3], 3, 2, conditions=actions, seed=0, window=config.window)
    c = generate(model, video[:, :3], 3, 2, conditions=other, seed=0, window=config.window)
    assert torch.equal(a, b) and torch.equal(a[:, 0], c[:, 0]) and (a[:, 1:] - c[:, 1:]).abs().max() > 1e-3
    with pytest.raises(Exception, match="actions, not text"):
        generate(model, video[:, :3], 1, 2, text=torch.zeros(1, 2, 8))


@pytest.mark.parametrize("arch", ["baseline", "scd"])
def test_flops_of_an_action_wan_equal_the_counted_stream(arch):
    """flops.py's Wan count without cross-attention is torch's count of each streamed frame (the
    Euler path: the clean pass of the previous frame, then K steps), up to and past the window."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scd.flops import chunk_flops, stream_flops

    config = world_wan(arch)
    model = random_model(config, 3)
    video, actions = clip(10)
    steps = 2
    with sdpa_kernel(SDPBackend.MATH):
        rollout = Rollout(model, video[:, :1], steps, actions=actions[:, :1], frames=8)
        totals = []
        for u in range(1, 8):
            with FlopCounterMode(display=False) as counter:
                rollout.step(actions[:, u])
            totals.append(counter.get_total_flops())
    for u, total in enumerate(totals):  # frame u + 1 starts with u frames cached before its clean pass
        assert chunk_flops(config, u, steps).total == total, u
    assert stream_flops(config) == 0.0 and totals[-1] == totals[-2]  # the window is full: flat


def test_the_recipe_through_the_cli(tmp_path):
    """Train a causal world Wan, resume it bit-identically, convert it into SCD-Wan by explicit
    blocks, post-train that, then `scd eval` and `scd bench` the pair."""
    runner = CliRunner()
    size = ["--family", "wan", "--arch", "baseline", "--heads", "2", "--head-dim", "16", "--layers", "3",
            "--patch-size", "8", "--default-steps", "2", "--batch-size", "2", "--clip-frames", "4", "--threads", "1"]
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "straight"), "--steps", "4", "--checkpoint-every", "2", *size])
    assert r.exit_code == 0, r.output
    # head dim 16: Wan's rotary split leaves each spatial axis 4 channels, and the user is told how to get more
    assert "gives each spatial axis 4 channels" in r.output and "--heads 1 --head-dim 32" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "causal"), "--steps", "2", *size])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "causal"), "--steps", "4", "--resume", *size])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "causal" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "causal" / "config.json").read_text())
    assert (config["family"], config["condition"], config["sampler"]) == ("wan", "action", "euler")

    r = runner.invoke(app, ["convert", str(tmp_path / "causal"), "--to", "scd", "--encoder-blocks", "0-1",
                            "--decoder-blocks", "0,2", "--out", str(tmp_path / "scd")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(tmp_path / "scd")])
    assert r.exit_code == 0 and "predicted SCD speed-up" in r.output and "actions (4 + null)" in r.output, r.output
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "scd"), "--out", str(tmp_path / "post"), "--steps", "2",
                            "--batch-size", "2", "--clip-frames", "4", "--threads", "1"])
    assert r.exit_code == 0, r.output
    scores = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "post"), "--baseline", str(tmp_path / "causal"),
                            "--clips", "2", "--frames", "3", "--threads", "1", "--json", str(scores)])
    assert r.exit_code == 0, r.output
    result = json.loads(scores.read_text())
    assert len(result["scd"]["psnr_per_frame"]) == len(result["baseline"]["psnr_per_frame"]) == 3
    report = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "--model", str(tmp_path / "post"), "--baseline", str(tmp_path / "causal"),
                            "--frames", "3", "--reps", "1", "--threads", "1", "--json", str(report)])
    assert r.exit_code == 0, r.output
    bench = json.loads(report.read_text())
    assert bench["models"]["scd"]["layers"] == "2 encoder + 2 decoder" and bench["models"]["baseline"]["layers"] == "3"
    assert bench["predicted_speedup"] > 0 and bench["speedup"] > 0 and bench["realised_fraction"] > 0


def test_a_new_world_wan_is_told_when_its_rotary_split_starves_the_spatial_axes():
    from scd import train as training

    assert new_models.wan_rotary_note(new_models.new_wan_config(heads=2, head_dim=32)) is None
    note = new_models.wan_rotary_note(new_models.new_wan_config(heads=4, head_dim=16))
    assert "4 channels and time 8" in note.message and (note.heads, note.head_dim) == (2, 32)
