"""Training lowers the loss, resumes bit-identically, writes a loadable model folder."""

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config
from scd import data
from scd import train as training
from scd import world
from scd.checkpoints import load_model_folder
from scd.model import build_model
from scd.flow import add_noise, noised_context
from scd_cli.app import app

WORLD = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8, demo="world")


def fixed_batches(n=4, frames=4):
    """One batch of world clips, repeated: a loss that can and must go down."""
    batch = next(world.stream_batches(0, n, frames))
    return lambda start, rank=0, ranks=1: iter([batch] * 1000)


def test_loss_goes_down_for_both_archs(tmp_path):
    for arch in ("scd", "baseline"):
        config = tiny_config(arch=arch, **WORLD)
        settings = training.TrainSettings(steps=40, lr=3e-3, warmup=1, checkpoint_every=100, action_dropout=0.0)
        losses = [p.loss for p in training.train(config, tmp_path / arch, settings, fixed_batches())]
        assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, (arch, losses[:5], losses[-5:])
        assert load_model_folder(tmp_path / arch).config.arch == arch


def test_noised_context_keeps_the_clean_share_and_labels_the_rest():
    torch.manual_seed(0)
    video = torch.rand(64, 8, 3, 8, 8) * 2 - 1
    same, timesteps = noised_context(video, 1.0, 1.0)
    assert same is video and timesteps is None
    noisy, timesteps = noised_context(video, 0.25, 0.3)
    clean = timesteps == -1
    assert 0.15 < clean.float().mean() < 0.35
    assert torch.equal(noisy[clean], video[clean]) and not torch.equal(noisy[~clean], video[~clean])
    sigma = timesteps[~clean] / 1000
    assert sigma.min() > 0 and sigma.max() <= 0.3
    # each noised frame sits at its labelled level: (x - (1 - s) x0) / s is unit Gaussian noise
    s = sigma.view(-1, 1, 1, 1)
    implied = (noisy[~clean] - (1 - s) * video[~clean]) / s
    assert abs(implied.std().item() - 1) < 0.05


def test_scd_learns_with_noised_context(tmp_path):
    config = tiny_config(**WORLD)
    settings = training.TrainSettings(steps=40, lr=3e-3, warmup=1, checkpoint_every=100, action_dropout=0.0,
                                      clean_context_ratio=0.5, context_sigma_max=0.3)
    losses = [p.loss for p in training.train(config, tmp_path / "m", settings, fixed_batches())]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])


def test_learning_rate_warms_up_holds_and_decays_to_zero():
    settings = training.TrainSettings(steps=100, warmup=10, decay=20)
    factors = [training.lr_factor(s, settings) for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[80] == 1.0 and abs(factors[90] - 0.5) < 1e-9 and abs(factors[99] - 0.05) < 1e-9
    assert training.lr_factor(99, training.TrainSettings(steps=100, warmup=10)) == 1.0


def test_resume_is_bit_identical(tmp_path):
    config = tiny_config(**WORLD)
    make = lambda steps: training.TrainSettings(steps=steps, batch_size=2, clip_frames=3, checkpoint_every=3, warmup=2)
    batches = data.world_batches(make(6), config)
    straight = [p.loss for p in training.train(config, tmp_path / "a", make(6), batches)]
    first = [p.loss for p in training.train(config, tmp_path / "b", make(3), batches)]
    rest = [p.loss for p in training.train(config, tmp_path / "b", make(6), batches, resume=True)]
    assert first + rest == straight
    import dataclasses

    from scd.errors import ConfigError

    with pytest.raises(ConfigError, match="decoder_combine"):  # same tensors, another model: refused
        list(training.train(dataclasses.replace(config, decoder_combine="add"), tmp_path / "b", make(8), batches, resume=True))
    rows = (tmp_path / "b" / "losses.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and [float(r.split(",")[1]) for r in rows[1:]] == [round(v, 6) for v in straight]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_baseline_training_pass_matches_streaming_inference():
    """The masked one-pass training of the baseline computes what generation computes."""
    torch.manual_seed(0)
    config = tiny_config(arch="baseline", **WORLD)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    video = torch.randn(1, 4, 3, 32, 32)
    actions = torch.randint(0, 4, (1, 4))
    torch.manual_seed(1)
    loss = model.loss(video, actions)
    torch.manual_seed(1)
    sigma = torch.sigmoid(torch.randn(3)).view(1, 3)
    noise = torch.randn_like(video[:, 1:])
    noisy = add_noise(video[:, 1:], noise, sigma)
    total = 0.0
    with torch.no_grad():
        for j in range(1, 4):
            cache = model.new_cache(1, 8)
            model.append(video[:, :j], actions[:, :j], cache)
            v = model(noisy[:, j - 1], sigma[:, j - 1] * 1000, actions[:, j], cache)
            total += ((v - (noise[:, j - 1] - video[:, j])) ** 2).mean()
    assert abs(loss.item() - total.item() / 3) < 1e-4 * abs(loss.item())


def test_cli_train_and_bad_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m"
    r = runner.invoke(app, ["train", "--out", str(out), "--steps", "2", "--batch-size", "1", "--clip-frames", "3",
                            "--heads", "2", "--head-dim", "16", "--layers", "2", "--decoder-layers", "1", "--patch-size", "8"])
    assert r.exit_code == 0, r.output
    assert "scd train --out" in (out / "README.md").read_text()
    assert load_model_folder(out).config.decoder_layers == 1
    r = runner.invoke(app, ["train", "--out", str(out), "--steps", "0"])
    assert r.exit_code == 2 and "--steps" in r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--steps", "2", "--decay", "5"])
    assert r.exit_code == 2 and "--decay" in r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--clean-context-ratio", "1.5"])
    assert r.exit_code == 2 and "--clean-context-ratio" in r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--resume"])
    assert r.exit_code == 2 and "nothing to resume" in r.output


def test_train_on_a_folder_of_real_videos(tmp_path):
    import numpy as np

    from scd.video import write_video

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        frames = np.zeros((6, 20, 24, 3), np.uint8)
        for j in range(6):
            frames[j, 5:12, 2 * j:2 * j + 6] = (200, 50 * i, 90)
        write_video(data / f"clip{i}.mp4", frames, fps=8)
    (data / "clip0.actions.txt").write_text("right\n" * 6)
    out = tmp_path / "m"
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
                                 "--clip-frames", "4", "--heads", "2", "--head-dim", "16", "--layers", "2",
                                 "--decoder-layers", "1", "--patch-size", "8", "--frame-size", "16"])
    assert r.exit_code == 0, r.output
    assert load_model_folder(out).config.frame_size == (16, 16)
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), "--clip-frames", "50", "--steps", "1",
                                 "--overwrite"])
    assert r.exit_code == 2 and "at least 50 frames" in r.output
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(out), "--overwrite"])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_init_from_a_model_folder_and_impossible_sizes(tmp_path):
    runner = CliRunner()
    tiny = ["--steps", "1", "--batch-size", "1", "--clip-frames", "3", "--heads", "2", "--head-dim", "16",
            "--layers", "2", "--decoder-layers", "1", "--patch-size", "8"]
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "a"), *tiny])
    assert r.exit_code == 0, r.output
    start = load_model_folder(tmp_path / "a")
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--steps", "2",
                            "--batch-size", "1", "--clip-frames", "3", "--lr", "1e-2", "--warmup", "1"])
    assert r.exit_code == 0, r.output
    tuned = load_model_folder(tmp_path / "b")
    assert tuned.config == start.config  # the folder's architecture, not the size flags' defaults
    a, b = start.model.state_dict(), tuned.model.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "c"), *tiny[:-2], "--patch-size", "5"])
    assert r.exit_code == 2 and "error" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 2, r.output


def test_gradient_accumulation_mixed_precision_and_decoder_draws(tmp_path):
    """A step's batch in two passes and bf16 autocast train; bad values are refused naming their flag."""
    config = tiny_config(**WORLD)
    batch = next(world.stream_batches(0, 4, 4))
    one = lambda start, rank=0, ranks=1: iter([batch] * 10)
    plain = training.TrainSettings(steps=1, batch_size=4, warmup=1, action_dropout=0.0, ema_decay=0.0)
    losses = [p.loss for p in training.train(config, tmp_path / "acc", dataclasses_replace(plain, grad_accum=2, steps=3), one)]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    bf16 = [p.loss for p in training.train(config, tmp_path / "bf16", dataclasses_replace(plain, mixed_precision="bf16", steps=2), one)]
    assert len(bf16) == 2 and all(0 < v < 10 for v in bf16)
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--batch-size", "4", "--grad-accum", "3"])
    assert r.exit_code == 2 and "--grad-accum must divide the batch size (4)" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--mixed-precision", "fp16"])
    assert r.exit_code == 2 and "--mixed-precision must be one of auto, no, bf16" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--decoder-draws", "0"])
    assert r.exit_code == 2 and "--decoder-draws must be >= 1" in r.output, r.output


def dataclasses_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)
