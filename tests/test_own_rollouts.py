"""Training on the model's own rollouts and with object-weighted loss (issue 25)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import assert_resumes_bit_identically, random_model, tiny_config
from typer.testing import CliRunner

from scd import data, world
from scd import train as training
from scd.models import Objective
from scd.checkpoints import load_model
from scd.own_rollouts import OwnRollouts, lost_ball_weights, lost_objects, off_track, scene_lost
from scd_cli.app import app

WORLD = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8, demo="world")


@pytest.mark.parametrize("arch,past", [("scd", False), ("baseline", False), ("scd", True)])
def test_rollout_training_resumes_bit_identically(tmp_path, arch, past):
    config = tiny_config(arch=arch, **WORLD)
    make = lambda steps: training.TrainSettings(steps=steps, batch_size=2, clip_frames=4, checkpoint_every=3, warmup=2,
                                                rollout_clips=2, rollout_horizon=6, object_weight=3.0,
                                                rollout_past_lost_balls=past)
    batches = data.world_batches(make(6), config)
    straight = [p.loss for p in training.train(config, tmp_path / "a", make(6), batches)]
    first = [p.loss for p in training.train(config, tmp_path / "b", make(3), batches)]
    rest = [p.loss for p in training.train(config, tmp_path / "b", make(6), batches, resume=True)]
    assert first + rest == straight and len(straight) == 6
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["rollouts"]
    assert saved["generated"].shape == (2, 4, 3, 32, 32) and saved["position"].tolist() != [0, 0]


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_shifted_context_training_reads_the_shifted_frames_and_resumes_bit_identically(tmp_path, arch):
    config = tiny_config(arch=arch, **WORLD)
    make = lambda steps, share=0.5: training.TrainSettings(steps=steps, batch_size=2, clip_frames=4, checkpoint_every=3,
                                                           warmup=2, shift_share=share)
    assert_resumes_bit_identically(config, tmp_path, make, 4, 2)
    batches = data.world_batches(make(4), config)
    # the loss reads the shifted frames as context and the true ones as targets
    seen = []

    def loss(model, video, conditions, objective, **extra):
        seen.append((video, extra.get("context")))
        return model.loss(video, conditions, objective, **extra)

    list(training.train(config, tmp_path / "c", make(1), batches, loss=loss))
    video, context = seen[0]
    expected = next(world.stream_batches(0, 2, 4, shift_share=0.5))
    assert torch.equal(video, expected[0]) and torch.equal(context, expected[2]) and not torch.equal(video, context)


def test_a_stream_starts_from_truth_and_continues_from_its_own_frames():
    config = tiny_config(**WORLD)
    model = random_model(config).train()
    pool = OwnRollouts(config, streams=2, clip_frames=4, horizon=8, steps=10, seed=0)
    context, truth, actions, weight, sinks = pool.next_clips(model, 0)
    assert weight is None and sinks is None  # every pixel counts unless the streams run past lost balls
    assert model.training  # put back in training mode after generating
    assert context.shape == truth.shape == (2, 4, 3, 32, 32) and actions.shape == (2, 4)
    seed = int(pool.clip_seeds[0])
    frames, acts = world.render_clip(seed, 8)
    expected = torch.from_numpy(frames[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(truth[0], expected) and actions[0].tolist() == acts[:4].tolist()
    assert torch.equal(context[:, :3], truth[:, :3])  # the true start
    assert not torch.equal(context[:, 3], truth[:, 3]) and context.abs().max() <= 1  # the model's frame, clamped
    before = context.clone()
    context, truth, _, _, _ = pool.next_clips(model, 1)
    restarted = pool.position == 4  # a stream that lost the scene starts afresh
    for i in np.flatnonzero(~restarted):
        assert torch.equal(context[i, :3], before[i, 1:])  # the window slides over its own frames
        assert torch.equal(truth[i], torch.from_numpy(frames[1:5] if i == 0 else world.render_clip(
            int(pool.clip_seeds[i]), 8)[0][1:5]).permute(0, 3, 1, 2).float() / 127.5 - 1)


def _frames(clip: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_lost_objects_and_the_scene_against_the_truth():
    seed, n = 5, 6
    truth = _frames(world.render_clip(seed, n)[0])
    shifts = np.zeros((n, 3, 2), np.int64)
    shifts[:, 0] = (2, 0)  # the red ball drawn 2 px off (slot 0 is the red ball), the rest in place
    off = _frames(world.simulate(seed, n, shifts=shifts).frames)
    lost = lost_objects(off, truth)
    assert lost["red_ball"].all() and not lost["green_ball"].any() and not lost["agent"].any()
    assert off_track(off, truth).all() and not off_track(truth, truth).any()
    assert not scene_lost(off, truth).any() and not scene_lost(truth, truth).any()
    tinted = (truth + 0.3 * (world.object_mask(truth).logical_not().float())).clamp(-1, 1)  # the scene's colours drift
    assert scene_lost(tinted, truth).all() and not lost_objects(tinted, truth)["agent"].any()
    scene_db = lambda v: -10 * math.log10(float(((v - truth)[~world.object_mask(truth).expand_as(truth)] ** 2).mean()) / 4)
    faint = (truth + 0.05 * (world.object_mask(truth).logical_not().float())).clamp(-1, 1)  # ~32 dB off: a slight drift
    assert 27 < scene_db(faint) < 36, scene_db(faint)
    assert not scene_lost(faint, truth).any() and scene_lost(faint, truth, threshold=scene_db(faint) + 1).all()
    assert not scene_lost(faint, truth, threshold=scene_db(faint) - 1).any()


def test_lost_ball_weights_leave_out_the_lost_ball_where_it_is_and_where_it_was_drawn():
    seed, n = 5, 4
    truth = _frames(world.render_clip(seed, n)[0])[None].repeat(2, 1, 1, 1, 1)
    shifts = np.zeros((n, 3, 2), np.int64)
    shifts[:, 0] = (6, 0)
    context = _frames(world.simulate(seed, n, shifts=shifts).frames)[None].repeat(2, 1, 1, 1, 1)
    weight = lost_ball_weights(context, truth, np.array([[True, False], [False, False]]))
    assert weight.shape == (2, n, 1, 32, 32) and torch.equal(weight[1], torch.ones_like(weight[1]))
    red = world.object_mask(truth[0], ["red_ball"]) | world.object_mask(context[0], ["red_ball"])
    assert (weight[0][red] == 0).all()  # the true ball and the drawn one, in every frame
    near = torch.nn.functional.max_pool2d(red.any(0).float(), 5, 1, 2) > 0  # 2 px around it, any frame
    assert (weight[0][:, ~near] == 1).all() and (weight[0][:, near] == 0).all()  # the rest counts
    assert (weight[0][world.object_mask(truth[0], ["agent", "green_ball"]) & ~near] == 1).any()
    assert 0.5 < weight[0].mean() < 1  # the ball's paths with their margin, not the frame


def test_streams_run_on_past_a_lost_ball_and_leave_it_out_of_the_loss():
    model = load_model(None).model.train()  # the embedded world model: it holds the agent and loses balls
    pool = OwnRollouts(model.config, streams=8, clip_frames=4, horizon=40, steps=10, seed=0, past_lost_balls=True)
    ran_on = 0
    for step in range(14):
        before = pool.position.copy()
        _, _, _, weight, _ = pool.next_clips(model, step)
        continued = pool.length > 0
        for i in range(8):
            if pool.lost_balls[i].any():
                assert weight[i].min() == 0  # the lost ball is out of the loss
                ran_on += int(continued[i] and before[i] > 3)
            else:
                assert (weight[i] == 1).all()
    assert ran_on > 0  # some stream generated on after losing a ball
    saved = pool.state_dict()
    again = OwnRollouts(model.config, streams=8, clip_frames=4, horizon=40, steps=10, seed=0, past_lost_balls=True)
    again.load_state_dict(saved)
    assert np.array_equal(again.lost_balls, pool.lost_balls)
    strict = OwnRollouts(model.config, streams=8, clip_frames=4, horizon=40, steps=10, seed=0, past_lost_balls=True,
                         scene_psnr=99.0)  # no generated scene is this close: every stream restarts after each frame
    for step in range(3):
        strict.next_clips(model, step)
        assert (strict.length == 0).all()


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_loss_with_its_own_context_and_unit_weights_is_the_plain_loss(arch):
    model = random_model(tiny_config(arch=arch, **WORLD)).train()
    video, actions = next(world.stream_batches(0, 2, 4))
    objective = Objective(clean_context_ratio=0.5, context_sigma_max=0.3)

    def loss(**kwargs):
        torch.manual_seed(0)
        return model.loss(video, actions, objective, **kwargs).item()

    plain = loss()
    assert loss(context=video.clone()) == plain
    assert loss(weight=torch.ones(2, 4, 1, 32, 32)) == pytest.approx(plain, rel=1e-5)
    assert loss(context=torch.zeros_like(video)) != plain
    assert loss(weight=world.object_weights(video, 10.0)) != pytest.approx(plain, rel=1e-3)


def test_object_weights_mark_the_objects_where_they_are_and_were():
    frames, _ = world.render_clip(3, 2)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[None] / 127.5 - 1
    weight = world.object_weights(video, 4.0)
    assert weight.shape == (1, 2, 1, 32, 32) and set(weight.unique().tolist()) == {1.0, 5.0}
    first = (weight[0, 0, 0] > 1).numpy()
    agent_at, _ = world.locate(frames[:1], world.OBJECT_COLORS["agent"])
    r, c = np.round(agent_at[0]).astype(int)
    assert first[r, c] and 16 <= first.sum() <= 3 * 16  # three 4x4 objects (the pillar may hide part of a ball)
    assert ((weight[0, 1, 0] > 1).numpy() >= first).all()  # where they were stays weighted


def test_rollout_options_need_the_world(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "m"), "--data", str(tmp_path), "--rollout-clips", "2"])
    assert r.exit_code == 2 and "--data world" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "m"), "--data", str(tmp_path), "--occlusion-share", "0.5"])
    assert r.exit_code == 2 and "--data world" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "m"), "--data", str(tmp_path), "--shift-share", "0.5"])
    assert r.exit_code == 2 and "--data world" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "w"), "--family", "wan", "--shift-share", "0.5"])
    assert r.exit_code == 2 and "FAR-style" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "m"), "--rollout-past-lost-balls"])
    assert r.exit_code == 2 and "--rollout-clips" in r.output and not (tmp_path / "m").exists(), r.output
    with pytest.raises(Exception, match="occlusion_share"):
        training.TrainSettings(occlusion_share=1.5)
    with pytest.raises(Exception, match="shift_share"):
        training.TrainSettings(shift_share=-0.1)
    with pytest.raises(Exception, match="rollout_past_lost_balls"):
        training.TrainSettings(rollout_past_lost_balls=True)
    with pytest.raises(Exception, match="rollout_past_lost_balls"):
        training.TrainSettings(rollout_clips=2, rollout_scene_psnr=30.0)
    with pytest.raises(Exception, match="rollout_scene_psnr"):
        training.TrainSettings(rollout_clips=2, rollout_past_lost_balls=True, rollout_scene_psnr=0.0)
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "m"), "--rollout-clips", "2", "--rollout-scene-psnr", "30"])
    assert r.exit_code == 2 and "--rollout-past-lost-balls" in r.output and not (tmp_path / "m").exists(), r.output
    with pytest.raises(Exception, match="rollout_horizon"):
        training.TrainSettings(clip_frames=4, rollout_clips=2, rollout_horizon=4)
    settings = dataclasses.replace(training.TrainSettings(steps=10), rollout_clips=4, object_weight=3.0,
                                   occlusion_share=0.25, shift_share=0.5)
    from scd.cards import training_card

    card = training_card("scd train", tiny_config(**WORLD), settings, "synthetic world")([0.5] * 10, 60.0)
    assert "4 clips per step from the model's own rollouts" in card and "x4 on the moving objects" in card
    assert "25% of each batch's clips ending at an occlusion" in card
    assert "50% of each batch's clips with an object drawn 1 px off in one context frame" in card
    assert "run on past a lost ball" not in card
    card = training_card("scd train", tiny_config(**WORLD), dataclasses.replace(settings, rollout_past_lost_balls=True),
                         "synthetic world")([0.5] * 10, 60.0)
    assert "beside the true ones, run on past a lost ball (its pixels out of the loss) until the scene is below 25 dB" in card


def test_rope_scores_depend_only_on_frame_offsets():
    """A rolling window needs no re-based positions: keys are rotated at their absolute frame, the
    query at its own, and q.k depends on the offset alone (angles in float64), so frame 1,000 of a
    window of 3 scores its keys as frame 3 did in training."""
    from scd.models.layers import apply_rope, rope_tables

    torch.manual_seed(0)
    q, k = torch.randn(16, 16), torch.randn(3 * 16, 16)

    def scores(first: int):
        cos, sin = rope_tables(torch.arange(first, first + 4), 4, 4, (4, 6, 6))
        t = 16
        return apply_rope(q, cos[3 * t:], sin[3 * t:]) @ apply_rope(k, cos[:3 * t], sin[:3 * t]).T

    assert torch.allclose(scores(0), scores(997), atol=1e-4) and torch.allclose(scores(0), scores(99_997), atol=1e-3)
