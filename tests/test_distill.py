"""Few-step distillation (scd/distill.py): the objective is exact (zero for the teacher at its own
steps), the student's training sample is what its stream generates, distillation closes the gap
to the teacher on held-out clips and noise, resumes bit-identically, and the CLI refuses bad pairs."""

import dataclasses

import pytest
import torch
from conftest import random_model, tiny_config
from safetensors.torch import load_file
from test_wan_scd import tiny as tiny_wan
from typer.testing import CliRunner

from scd import data, world
from scd import train as training
from scd.checkpoints import load_model_folder, save_model_folder
from scd.distill import TrajectoryDistillation, distillation, sample
from scd.errors import ConfigError
from scd.loaded import LoadedModel
from scd.sampling import generate
from scd_cli.app import app

WORLD = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8, demo="world")


def loaded(model, source="m") -> LoadedModel:
    return LoadedModel(model, model.config, source)


def copy_of(model):
    twin = random_model(model.config, seed=99)
    twin.load_state_dict(model.state_dict())
    return twin


def test_the_loss_is_exactly_zero_for_the_teacher_at_its_own_steps():
    """A student equal to the teacher, at the teacher's steps, makes the teacher's samples bit for
    bit (loss 0.0); fewer steps or another decoder do not. Both families: the FAR-style SCD (Euler)
    and SCD from Wan (re-noising; at one step its sampler is the ODE's)."""
    config = tiny_config()
    teacher = random_model(config)
    video = torch.randn(2, 4, 3, 4, 4)
    actions = torch.randint(0, 5, (2, 4))
    noise = torch.randn(2, 3, 3, 4, 4)
    assert TrajectoryDistillation(teacher, 3, 3).loss(copy_of(teacher), video, actions, noise).item() == 0.0
    assert TrajectoryDistillation(teacher, 1, 3).loss(copy_of(teacher), video, actions, noise).item() > 1e-4
    other = copy_of(teacher)
    with torch.no_grad():
        other.decoder.proj_out.bias.add_(0.01)
    assert TrajectoryDistillation(teacher, 3, 3).loss(other, video, actions, noise).item() > 1e-5

    wan = random_model(tiny_wan())
    text, clip = torch.randn(2, 5, 8), torch.randn(2, 4, 4, 4, 6)
    wan_noise = torch.randn(2, 4, 4, 4, 6)
    assert TrajectoryDistillation(wan, 1, 1).loss(copy_of(wan), clip, text, wan_noise).item() == 0.0
    draws = torch.randn(1, 2, 4, 4, 4, 6)
    assert TrajectoryDistillation(wan, 2, 4).loss(copy_of(wan), clip, text, wan_noise, draws).item() > 1e-4


def test_the_students_training_sample_is_what_its_stream_generates():
    """Under teacher forcing the K-step sample of the last frame (FAR: frame j from the true frames
    before it) and of the last chunk (Wan, with the same noise and re-noising draws) equal the
    frames `generate` streams from the true context."""
    config = tiny_config()
    model = random_model(config)
    video, actions = torch.randn(2, 4, 3, 4, 4), torch.randint(0, 4, (2, 4))
    noise = torch.randn(2, 3, 3, 4, 4)
    with torch.no_grad():
        features = model.teacher_forced_features(video, actions)
        trained = sample(config, model.frame_velocity(features, actions), noise, 2)
    streamed = generate(model, video[:, :3], 1, 2, conditions=actions, noise=noise[:, -1:])
    assert (trained[:, -1] - streamed[:, 0]).abs().max() < 1e-4

    wan = random_model(tiny_wan())
    text, clip = torch.randn(1, 5, 8), torch.randn(1, 4, 4, 4, 6)
    wan_noise, draws = torch.randn(1, 4, 4, 4, 6), torch.randn(2, 1, 4, 4, 4, 6)
    with torch.no_grad():
        features = wan.teacher_forced_features(clip, text, wan_noise, 1000.0)
        trained = sample(wan.config, wan.frame_velocity(features, text), wan_noise, 3, draws)
    streamed = generate(wan, clip[:, :2], 2, 3, text=text, noise=wan_noise[:, 2:], draws=draws[None, :, :, 2:])
    assert (trained[:, 2:] - streamed).abs().max() < 1e-4


def held_out(config, clips=4):
    """World clips and noise no training step sees (seeds from 1e9, as scd eval's)."""
    video, actions = next(world.stream_batches(world.HELDOUT_SEED_START, clips, 3))
    noise = torch.randn(clips, 2, config.channels, *config.latent_size, generator=torch.Generator().manual_seed(7))
    return video, actions, noise


def test_distillation_closes_the_gap_to_the_teacher_on_held_out_clips(tmp_path):
    """A tiny SCD on the world distilled from 3 steps to 1 for 30 steps (`--data world`): its
    1-step samples of held-out clips from held-out noise come much closer to the teacher's 3-step
    ones; the written folder defaults to 1 step and says how it was made."""
    config = tiny_config(**WORLD)
    teacher = random_model(config)
    student = loaded(copy_of(teacher))
    objective = distillation(loaded(teacher, "teacher"), student, 1, 3)
    video, actions, noise = held_out(config)
    before = objective.gap(student.model, video, actions, noise)
    settings = training.TrainSettings(steps=30, batch_size=4, clip_frames=3, lr=3e-3, warmup=1, ema_decay=0.0,
                                      checkpoint_every=100)
    card = objective.card(lambda losses, wall: "# trained\n\n- data: world\n")
    list(training.train(student.config, tmp_path / "s", settings, data.world_batches(settings, config), student,
                        card=card, loss=objective))
    written = load_model_folder(tmp_path / "s")
    after = objective.gap(written.model, video, actions, noise)
    assert after < 0.5 * before, (before, after)
    assert written.config.default_steps == 1 and written.config.default_guidance == 1.0
    assert all(torch.equal(a, b) for a, b in zip(written.model.encoder.parameters(), teacher.encoder.parameters()))
    assert "trajectory (ODE) distillation of the decoder to 1 steps" in (tmp_path / "s" / "README.md").read_text()


def test_resume_is_bit_identical(tmp_path):
    config = tiny_config(**WORLD)
    teacher = random_model(config)
    make = lambda steps: training.TrainSettings(steps=steps, batch_size=2, clip_frames=3, checkpoint_every=3, warmup=2)
    batches = data.world_batches(make(6), config)

    def run(out, steps, resume=False, loss=True):
        student = loaded(copy_of(teacher))
        objective = distillation(loaded(teacher), student, 1, 2)
        return [p.loss for p in training.train(student.config, out, make(steps), batches, student, resume=resume,
                                               loss=objective if loss else None)]

    straight = run(tmp_path / "a", 6)
    first, rest = run(tmp_path / "b", 3), run(tmp_path / "b", 6, resume=True)
    assert first + rest == straight
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="objective trajectory 1 from 2, not flow matching"):
        run(tmp_path / "b", 8, resume=True, loss=False)


def test_cli_distills_and_refuses_bad_pairs(tmp_path):
    runner = CliRunner()
    config = tiny_config(**WORLD)
    save_model_folder(random_model(config), tmp_path / "teacher")
    base = ["train", "--steps", "2", "--batch-size", "1", "--clip-frames", "3", "--threads", "1"]
    r = runner.invoke(app, base + ["--out", str(tmp_path / "s"), "--distill-from", str(tmp_path / "teacher"),
                                   "--distill-steps", "1", "--teacher-steps", "3"])
    assert r.exit_code == 0, r.output
    assert load_model_folder(tmp_path / "s").config.default_steps == 1
    card = (tmp_path / "s" / "README.md").read_text()
    assert "--distill-steps 1" in card and "regressed onto" in card and "at 3 steps" in card
    assert len((tmp_path / "s" / "losses.csv").read_text().splitlines()) == 3

    save_model_folder(random_model(tiny_config(arch="baseline", **WORLD)), tmp_path / "baseline")
    save_model_folder(random_model(dataclasses.replace(config, num_heads=4)), tmp_path / "wider")
    save_model_folder(random_model(config, seed=5), tmp_path / "stranger")
    teacher = ["--distill-from", str(tmp_path / "teacher")]
    cases = [
        (teacher + ["--distill-steps", "3"], "--distill-steps (3) must be fewer than --teacher-steps (3)"),
        (teacher + ["--distill-steps", "2", "--teacher-steps", "1"], "must be fewer than --teacher-steps (1)"),
        (teacher + ["--distill-steps", "0"], "--distill-steps must be >= 1"),
        (["--distill-steps", "1"], "distillation needs a teacher: give --distill-from"),
        (teacher, "give --distill-steps"),
        (["--distill-from", str(tmp_path / "baseline"), "--distill-steps", "1"], "the teacher must be an SCD model"),
        (teacher + ["--init", str(tmp_path / "baseline"), "--distill-steps", "1"], "not an SCD model"),
        (teacher + ["--init", str(tmp_path / "wider"), "--distill-steps", "1"], "num_heads 4 vs 2"),
        (teacher + ["--init", str(tmp_path / "stranger"), "--distill-steps", "1"], "another encoder than the teacher"),
        (teacher + ["--distill-steps", "1", "--sigma-shift", "3"], "--sigma-shift belongs to the flow-matching loss"),
    ]
    for flags, message in cases:
        r = runner.invoke(app, base + ["--out", str(tmp_path / "x")] + flags)
        assert r.exit_code == 2 and message in " ".join(r.output.split()), (flags, r.output)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
