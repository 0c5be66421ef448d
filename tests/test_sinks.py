"""Attention sinks of the FAR family: a stream's first frames kept beside the rolling window, seen
where training puts them (`sink_distance` before the window's oldest frame) however long it runs."""

import dataclasses

import pytest
import torch
from conftest import assert_resumes_bit_identically, random_model, stream_inputs, tiny_config

from scd.errors import ConfigError
from scd.models import patchify, unpatchify
from scd.models.far import sink_mask, teacher_forcing_mask
from scd.models.layers import block_causal_mask, rope_tables
from scd.sampling import Rollout, generate, sigma_schedule

B, K, W = 2, 3, 3


def sink_config(arch="scd", **overrides):
    return tiny_config(arch=arch, window=W, sink_frames=1, sink_distance=5, **overrides)


def euler(velocity, x, steps):
    sig = sigma_schedule(steps)
    for k in range(steps):
        x = x + (sig[k + 1] - sig[k]) * velocity(x, (sig[k] * 1000).expand(x.shape[0]))
    return x


def test_sinks_need_a_window_and_sensible_numbers():
    with pytest.raises(ConfigError, match="sink_frames needs a window"):
        tiny_config(sink_frames=1)
    with pytest.raises(ConfigError, match="sink_distance must be an integer >= 1"):
        tiny_config(window=3, sink_frames=1, sink_distance=0)
    with pytest.raises(ConfigError, match="sink_frames must be an integer >= 0"):
        tiny_config(window=3, sink_frames=-1)


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_a_stream_from_a_sink_and_a_window_is_what_training_shows(arch):
    """Given [sink, W frames], the frame a stream makes is the one the training pass's layout
    makes: the sink clean, unconditioned, `sink_distance` before the clip's first frame."""
    model = random_model(sink_config(arch))
    c = model.config
    context, actions, noise = stream_inputs(c, B, W + 1, 1, seed=2)
    got = generate(model, context, 1, K, conditions=actions, noise=noise, window=W)[:, 0]
    sink, clip = context[:, :1], context[:, 1:]
    null = torch.full((B, 1), c.null_class)
    sink_at = model.sink_positions(0) if arch == "baseline" else model.encoder.sink_positions(0)
    assert sink_at.tolist() == [-c.sink_distance]
    with torch.inference_mode():
        if arch == "scd":
            frames = torch.cat([sink, clip], 1)
            labels = torch.cat([null, actions[:, 2:W + 2]], 1)  # each frame with the action after it
            positions = torch.cat([sink_at, torch.arange(W)])
            features = model.encoder(frames, labels, positions=positions)[:, -1]
            expected = euler(lambda x, t: model.decoder(x, t, features, actions[:, W + 1]), noise[:, 0], K)
        else:
            t = c.tokens_per_frame

            def velocity(x, timesteps):
                frames = torch.cat([sink, clip, x[:, None]], 1)
                steps = torch.cat([torch.full((B, W + 1), -1.0), timesteps[:, None]], 1)
                labels = torch.cat([null, actions[:, 1:W + 2]], 1)
                tokens = model.x_embedder(patchify(frames, c.patch_size))
                emb = model.conditioning(steps, labels)
                rope = rope_tables(torch.cat([sink_at, torch.arange(W + 1)]), 2, 2, c.rope_axes)
                mask = sink_mask(block_causal_mask(W + 1, 0, t, "cpu"), 1, t)
                hidden = model.norm_out(model.run_blocks(tokens, emb, rope, mask), emb)[:, -1:]
                return unpatchify(model.proj_out(hidden), c.patch_size, *x.shape[-2:])[:, 0]

            expected = euler(velocity, noise[:, 0], K)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_sinks_are_placed_where_a_frame_encoded_there_would_be(arch):
    """However often the ring wrapped, the sink's cached keys are those of the sink frame encoded
    alone at `sink_distance` before the oldest window frame (rotary angles add up)."""
    model = random_model(sink_config(arch))
    transformer = model.encoder if arch == "scd" else model
    c = model.config
    context, actions, _ = stream_inputs(c, B, 4, 10, seed=3)
    rollout = Rollout(model, context, K, actions=actions[:, :4], window=W)
    for u in range(10):
        rollout.step(actions[:, 4 + u])
    with torch.inference_mode():
        cache = rollout.state.cache
        assert cache.frames == 13 and cache.sinks == 1 and cache.slot(13) == 1 + (13 - 1) % W
        oldest = cache.oldest(writing=True)
        transformer.place_sinks(cache, oldest)
        alone = transformer.new_cache(B, 1)
        alone.frames = int(transformer.sink_positions(oldest)[0])  # the position it is written at
        transformer.encode_frames(context[:, :1], torch.full((B, 1), -1.0), torch.full((B, 1), c.null_class), alone)
    t = c.tokens_per_frame
    for placed, direct in zip(cache.keys, alone.keys):
        assert (placed[:, :, :t] - direct[:, :, :t]).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_a_long_stream_with_sinks_runs_the_same_eager_and_compiled(arch):
    model = random_model(sink_config(arch))
    context, actions, noise = stream_inputs(model.config, B, 4, 20, seed=4)
    eager = generate(model, context, 20, K, conditions=actions, noise=noise, window=W)
    compiled = generate(model, context, 20, K, conditions=actions, noise=noise, window=W, compiled="eager")
    assert (eager - compiled).abs().max() < 1e-5
    plain = random_model(tiny_config(arch=arch, window=W))
    plain.load_state_dict(model.state_dict())
    without = generate(plain, context, 20, K, conditions=actions, noise=noise, window=W)
    assert (eager - without).abs().max() > 1e-3  # the sink is seen


def test_the_sink_mask_lets_every_frame_see_the_sinks_and_them_only_themselves():
    t = 2
    mask = sink_mask(teacher_forcing_mask(3, t, "cpu"), 2, t)
    assert mask.shape == (2 * t + 5 * t,) * 2
    assert mask[2 * t:, :2 * t].all()  # every frame sees both sinks
    assert mask[:t, :t].all() and not mask[:t, t:].any()  # sink 0: itself only
    assert mask[t:2 * t, :2 * t].all() and not mask[t:2 * t, 2 * t:].any()  # sink 1: sink 0 and itself
    assert torch.equal(mask[2 * t:, 2 * t:], teacher_forcing_mask(3, t, "cpu"))


WORLD = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8, demo="world")


def test_world_batches_bring_each_clips_sink_frames_from_its_own_scene():
    from scd import world

    video, actions, context, sinks = next(world.stream_batches(0, 3, 4, sinks=2))
    assert sinks.shape == (3, 2, 3, 32, 32) and torch.equal(context, video)
    for i, seed in enumerate(world.training_seeds(0, 0, 3)):
        clip = world.simulate(int(seed), world.SINK_SPAN[1] + 2)
        frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        # two consecutive frames of the same clip from frame SINK_SPAN[0] or later: its scene, its objects elsewhere
        found = [j for j in range(world.SINK_SPAN[0], world.SINK_SPAN[1]) if torch.equal(frames[j:j + 2], sinks[i])]
        assert found, i
    again = next(world.stream_batches(0, 3, 4, start_step=0, sinks=2))
    assert torch.equal(again[3], sinks)  # batch k depends on (seed, k) only


def test_scattered_sinks_keep_the_scene_and_draw_every_object_anywhere():
    import numpy as np

    from scd import world

    plain = next(world.stream_batches(0, 16, 4, sinks=1))[3]
    scattered = next(world.stream_batches(0, 16, 4, sinks=1, sink_scatter=True))[3]
    assert torch.equal(next(world.stream_batches(0, 16, 4, sinks=1, sink_scatter=True))[3], scattered)
    to_uint8 = lambda t: ((t[:, 0].permute(0, 2, 3, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    plain, scattered = to_uint8(plain), to_uint8(scattered)
    moved = 0
    for i, seed in enumerate(world.training_seeds(0, 0, 16)):
        scene = world.render_clip(int(seed), 1, objects=False)[0][0]
        objects = np.zeros((32, 32), bool)
        for color in world.OBJECT_COLORS.values():  # every object drawn once, whole unless the pillar hides it
            near = (np.abs(scattered[i].astype(int) - color) <= world.TOLERANCE).all(-1)
            assert near.sum() in range(4, 17), (i, color)
            objects |= near
        assert (scattered[i][~objects] == scene[~objects]).all(), i  # the rest is the clip's own scene
        for color in world.OBJECT_COLORS.values():
            at = [world.locate(f[None], color)[0][0] for f in (plain[i], scattered[i])]
            moved += np.abs(at[0] - at[1]).max() > 2
    assert moved > 30  # of 48 objects: drawn at places of their own, not where the clip has them


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_sink_training_reads_the_sinks_resumes_bit_identically_and_refuses_data_without_them(tmp_path, arch):
    from scd import data
    from scd import train as training
    from scd.own_rollouts import OwnRollouts

    config = tiny_config(arch=arch, window=3, sink_frames=1, **WORLD)
    make = lambda steps: training.TrainSettings(steps=steps, batch_size=2, clip_frames=4, checkpoint_every=2, warmup=1,
                                                rollout_clips=2, rollout_horizon=8)
    assert_resumes_bit_identically(config, tmp_path, make, 4, 2)
    batches = data.world_batches(make(4), config)
    seen = []

    def loss(model, video, conditions, objective, **extra):
        seen.append(extra.get("sinks"))
        return model.loss(video, conditions, objective, **extra)

    list(training.train(config, tmp_path / "c", make(1), batches, loss=loss))
    assert seen[0].shape == (4, 1, 3, 32, 32)  # two true clips' sinks, then two streams' first true frames
    pool = OwnRollouts(config, streams=2, clip_frames=4, horizon=8, steps=1, seed=0)
    *_, sinks = pool.next_clips(random_model(config).train(), 0)
    assert torch.equal(sinks, pool.truth[:, :1]) and torch.equal(seen[0][2:], sinks)
    model = random_model(config).train()
    video, actions = next(world_batches_without_sinks())
    with torch.no_grad():  # the sinks change what the model reads
        torch.manual_seed(0)
        a = model.loss(video, actions, sinks=video[:, :1])
        torch.manual_seed(0)
        b = model.loss(video, actions, sinks=-video[:, :1])
    assert (a - b).abs() > 1e-6
    plain = lambda start, rank=0, ranks=1: world_batches_without_sinks(start)
    with pytest.raises(ConfigError, match="sink frames"):
        list(training.train(config, tmp_path / "d", make(1), plain))
    scatter = dataclasses.replace(make(1), sink_scatter=True)
    with pytest.raises(ConfigError, match="sink_frames") as refused:
        list(training.train(tiny_config(arch=arch, window=3, **WORLD), tmp_path / "e", scatter, plain))
    assert refused.value.parameter == "sink_scatter"


def world_batches_without_sinks(start=0):
    from scd import world

    return world.stream_batches(0, 2, 4, start)


def test_scd_train_adds_sinks_and_the_folder_generates_with_them(tmp_path):
    from typer.testing import CliRunner

    from scd_cli.app import app

    runner = CliRunner()
    tiny = ["--heads", "2", "--head-dim", "8", "--layers", "2", "--decoder-layers", "1", "--patch-size", "8",
            "--batch-size", "2", "--clip-frames", "4", "--steps", "2", "--threads", "1", "-q"]
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "m"), *tiny, "--sink-frames", "1", "--sink-scatter"])
    assert r.exit_code == 0, r.output
    from scd.checkpoints import load_model

    config = load_model(str(tmp_path / "m")).config
    assert config.sink_frames == 1 and config.window == 3
    r = runner.invoke(app, ["info", str(tmp_path / "m")])
    assert r.exit_code == 0 and "attention sinks" in r.output, r.output
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "m"), "--frames", "6", "--out", str(tmp_path / "x.mp4")])
    assert r.exit_code == 0 and (tmp_path / "x.mp4").stat().st_size > 0, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "d"), "--data", str(tmp_path), "--sink-frames", "1"])
    assert r.exit_code == 2 and "--data world" in r.output, r.output
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "m"), "--out", str(tmp_path / "n"), *tiny[8:], "--sink-frames", "0"])
    assert r.exit_code == 0, r.output
    assert load_model(str(tmp_path / "n")).config.sink_frames == 0  # a fine-tune may take them away again
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "n"), "--out", str(tmp_path / "o"), *tiny[8:], "--sink-scatter"])
    assert r.exit_code == 2 and "--sink-frames" in r.output and "Traceback" not in r.output, r.output
