import numpy as np
import pytest
import torch

from scd import world
from scd.errors import ConfigError
from scd.metrics import psnr, ssim, uint8_to_unit
from scd.train import TrainSettings


def test_deterministic_and_actions_matter_only_forward():
    frames, actions = world.render_clip(11, 40)
    again, _ = world.render_clip(11, 40, actions)
    assert np.array_equal(frames, again)
    other = actions.copy()
    other[20:] = np.where(other[20:] == 0, 1, 0)
    changed, _ = world.render_clip(11, 40, other)
    assert np.array_equal(changed[:20], frames[:20])
    assert not np.array_equal(changed[20:], frames[20:])


def agent_cells(frames):
    """(row, col) of the agent's top-left corner per frame, from its white pixels (None if hidden)."""
    out = []
    for f in frames:
        rows, cols = np.nonzero((f == world.AGENT_COLOR).all(-1))
        out.append((rows.min(), cols.min()) if len(rows) else None)
    return out


@pytest.mark.parametrize("action", [0, 1, 2, 3, 4])
def test_agent_moves_the_pressed_way(action):
    """Each action moves the agent STEP px its way (until a wall); the null action keeps it still."""
    moved = 0
    for seed in range(40):
        frames, _ = world.render_clip(seed, 3, np.array([4, action, action]))
        cells = agent_cells(frames)
        pillar = np.nonzero((frames[0] == world.PILLAR_COLOR).all(-1).all(0))[0]
        if None in cells or abs(cells[0][1] - pillar.mean()) < 12:  # the pillar could hide part of the agent
            continue
        (r0, c0), (r1, c1), (r2, c2) = cells
        dy, dx = world.MOVES[action]
        for (ra, ca), (rb, cb) in (((r0, c0), (r1, c1)), ((r1, c1), (r2, c2))):
            expected = (min(max(ra + dy, 0), 32 - world.AGENT), min(max(ca + dx, 0), 32 - world.AGENT))
            assert (rb, cb) == expected, (seed, action)
        moved += 1
    assert moved >= 5


@pytest.mark.parametrize("seed", [3, 8])
def test_balls_stay_inside_and_the_agent_is_drawn(seed):
    """Over 500 frames each ball bounces off all four walls and never leaves: it is on screen in
    every frame but where the agent or the other ball covers it, whole (BALL x BALL) in most, its
    pixels always make one box no bigger than a ball, and at a wall it is whole across the wall."""
    frames, _ = world.render_clip(seed, 500)
    assert frames.shape == (500, 32, 32, 3) and frames.dtype == np.uint8
    assert ((frames == world.AGENT_COLOR).all(-1).sum((1, 2)) > 0).all()  # the agent in every frame
    for color in world.OBJECT_COLORS.values():
        if color == tuple(world.AGENT_COLOR):
            continue
        ball = (frames == np.array(color, np.uint8)).all(-1)  # (N, H, W)
        count = ball.sum((1, 2))
        assert (count > 0).mean() > 0.99 and (count == world.BALL ** 2).mean() > 0.6, (color, count.min())
        rows, cols = ball.any(2), ball.any(1)  # (N, H), (N, W): the rows and columns it covers
        for covered in (rows, cols):
            seen = covered[count > 0]
            first, last = seen.argmax(1), covered.shape[1] - 1 - seen[:, ::-1].argmax(1)
            assert (last - first < world.BALL).all()
            assert first.min() == 0 and last.max() == covered.shape[1] - 1  # it reached both walls
            at_wall = (first == 0) | (last == covered.shape[1] - 1)
            assert (last - first + 1 == world.BALL)[at_wall].all()  # and was whole there: not half outside


def test_training_and_heldout_seeds_never_meet():
    drawn = np.concatenate([world.training_seeds(s, step, 64) for s in range(3) for step in range(200)])
    assert drawn.max() < world.HELDOUT_SEED_START
    assert drawn.min() >= 0 and len(np.unique(drawn)) > 0.99 * len(drawn)
    heldout = [world.HELDOUT_SEED_START + i for i in range(64)]
    assert not set(heldout) & set(drawn.tolist())
    batch = next(world.stream_batches(2, 3, 2, start_step=5))[0]
    expected = [world.render_clip(int(s), 2)[0] for s in world.training_seeds(2, 5, 3)]
    assert torch.equal(batch, torch.from_numpy(np.stack(expected)).permute(0, 1, 4, 2, 3).float() / 127.5 - 1)


def test_object_tracking_against_ground_truth():
    frames, actions = world.render_clip(7, 6)
    truth = frames[None, 2:]  # (1, 4, H, W, 3)
    exact = world.track_objects(truth, truth)
    assert exact["agent"]["hit_rate"] == [1.0] * 4 and exact["agent"]["error_px"] == [0.0] * 4
    shifted = np.roll(truth, 3, axis=3)  # everything 3 px to the right: every object missed
    far = world.track_objects(shifted, truth)
    for name in world.OBJECT_COLORS:
        assert all(r == 0.0 for r, seen in zip(far[name]["hit_rate"], far[name]["visible_in_truth"]) if seen)
    assert all(abs(e - 3.0) < 0.6 for e in far["agent"]["error_px"] if e is not None)
    scene = world.render_clip(7, 6, actions, objects=False)[0][None, 2:]
    erased = world.track_objects(scene, truth)
    assert erased["agent"]["hit_rate"] == [0.0] * 4 and erased["agent"]["error_px"] == [None] * 4
    assert not (scene == world.AGENT_COLOR).all(-1).any()


def test_batches_resume_exactly_and_heldout_is_disjoint():
    a = world.stream_batches(5, 2, 4)
    next(a)
    second = next(a)
    resumed = next(world.stream_batches(5, 2, 4, start_step=1))
    assert torch.equal(second[0], resumed[0]) and torch.equal(second[1], resumed[1])
    assert second[0].shape == (2, 4, 3, 32, 32) and second[0].min() >= -1 and second[0].max() <= 1
    # the held-out clips are those of the held-out seeds, and no training clip is one of them
    heldout = world.heldout_clips(3, 4)
    for i, (frames, actions) in enumerate(heldout):
        again = world.render_clip(world.HELDOUT_SEED_START + i, 4)
        assert np.array_equal(frames, again[0]) and np.array_equal(actions, again[1])
    batches = world.stream_batches(5, 8, 4)
    training = torch.cat([next(batches)[0] for _ in range(4)])  # (32, 4, 3, 32, 32) in [-1, 1]
    for frames, _ in heldout:
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert not any(torch.equal(clip, t) for t in training)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="num_frames must be >= 1, got 0"):
        world.render_clip(1, 0)
    with pytest.raises(ConfigError, match=r"actions must be 3 indices in 0\.\.4"):
        world.render_clip(1, 3, np.array([0, 9, 1]))


def test_psnr_known_values():
    a = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 0.8 + 0.1
    assert torch.isinf(psnr(a, a)).all()
    e = 0.05
    assert torch.allclose(psnr(a + e, a), torch.full((2,), 10 * np.log10(1 / e ** 2), dtype=torch.float64))


def test_ssim_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(1, 1, 11, 11, generator=g, dtype=torch.float64)).clamp(0, 1)
    x = np.arange(11) - 5
    w1 = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w1, w1) / np.outer(w1, w1).sum()
    A, B = a[0, 0].numpy(), b[0, 0].numpy()
    mx, my = (w * A).sum(), (w * B).sum()
    sxx, syy, sxy = (w * A * A).sum() - mx ** 2, (w * B * B).sum() - my ** 2, (w * A * B).sum() - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    assert abs(ssim(b, a).item() - expected) < 1e-12
    assert abs(ssim(a, a).item() - 1) < 1e-12
    frames, _ = world.render_clip(2, 2)
    u = uint8_to_unit(frames)
    noisy = (u + 0.2 * torch.randn(u.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    slight = (u + 0.02 * torch.randn(u.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert (ssim(noisy, u) < ssim(slight, u)).all()


def test_simulated_state_matches_the_frames():
    clip = world.simulate(3, 40)
    frames, actions = world.render_clip(3, 40)
    assert np.array_equal(clip.frames, frames) and np.array_equal(clip.actions, actions)
    for j in range(40):  # each ball's colour fills the 4x4 cell the state says, except under the pillar, the agent
        # and the other ball (which of the two is drawn on top is the seed's)
        for b, name in enumerate(("red_ball", "green_ball")):
            y, x = clip.balls[j, b]
            cell = frames[j, y:y + world.BALL, x:x + world.BALL]
            drawn = (cell == world.OBJECT_COLORS[name]).all(-1)
            hidden = np.zeros_like(drawn)
            hidden[:, max(0, clip.pillar - x):max(0, clip.pillar + 3 - x)] = True
            ay, ax = clip.agent[j] - (y, x)
            hidden[max(0, ay):max(0, ay + world.AGENT), max(0, ax):max(0, ax + world.AGENT)] = True
            other = clip.balls[j, 1 - b] - (y, x)
            hidden[max(0, other[0]):max(0, other[0] + world.BALL), max(0, other[1]):max(0, other[1] + world.BALL)] = True
            assert (drawn | hidden).all()
        assert (frames[j, clip.agent[j][0], clip.agent[j][1]] == world.AGENT_COLOR).all() or \
            clip.pillar <= clip.agent[j][1] < clip.pillar + 3


def test_occlusion_clips_end_where_a_ball_meets_another_object():
    for seed in range(20):
        frames, actions = world.occlusion_clip(seed, 4)
        assert frames.shape == (4, 32, 32, 3) and actions.shape == (4,)
        clip = world.simulate(seed, world.OCCLUSION_SPAN)
        ends = [j + 1 for j in range(3, world.OCCLUSION_SPAN)
                if np.array_equal(clip.frames[j - 3:j + 1], frames) and np.array_equal(clip.actions[j - 3:j + 1], actions)]
        assert ends, "an occlusion clip is a window of its seed's clip"
        if clip.occluded()[3:].any():
            assert any(clip.occluded()[end - 1] for end in ends)
    # the meeting is real: the balls, or a ball and the agent, within a pixel of touching
    clip = world.simulate(0, world.OCCLUSION_SPAN)
    j = int(np.nonzero(clip.occluded())[0][0])
    gaps = [np.abs(clip.balls[j, 0] - clip.balls[j, 1]).max()] + [np.abs(b - clip.agent[j]).max() for b in clip.balls[j]]
    assert min(gaps) <= world.BALL
    # a batch's first share of clips are occlusion clips, the rest the plain ones, and resuming sees the same
    plain = next(world.stream_batches(7, 4, 4))
    mixed = next(world.stream_batches(7, 4, 4, occlusion_share=0.5))
    assert torch.equal(plain[0][2:], mixed[0][2:]) and not torch.equal(plain[0][:2], mixed[0][:2])
    seeds = world.training_seeds(7, 0, 4)
    for i in range(2):
        frames, actions = world.occlusion_clip(int(seeds[i]), 4)
        assert torch.equal(mixed[0][i], torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1)
        assert torch.equal(mixed[1][i], torch.from_numpy(actions))
    later = world.stream_batches(7, 4, 4, occlusion_share=0.5)
    next(later)
    second = next(later)
    again = next(world.stream_batches(7, 4, 4, start_step=1, occlusion_share=0.5))
    assert torch.equal(second[0], again[0])


def test_shifts_draw_an_object_off_without_moving_it():
    clip = world.simulate(5, 6)
    shifts = np.zeros((6, 3, 2), np.int64)
    assert np.array_equal(world.simulate(5, 6, shifts=shifts).frames, clip.frames)
    shifts[2, 0] = (1, -1)  # the red ball, one row down and one column left, in frame 2 only
    moved = world.simulate(5, 6, shifts=shifts)
    changed = (moved.frames != clip.frames).any(-1).any((1, 2))
    assert changed.tolist() == [False, False, True, False, False, False]
    assert np.array_equal(moved.balls, clip.balls) and np.array_equal(moved.agent, clip.agent)  # the state stays true
    red = world.OBJECT_COLORS["red_ball"]
    at, _ = world.locate(moved.frames[2:3], red)
    true, _ = world.locate(clip.frames[2:3], red)
    if clip.pillar + 3 <= clip.balls[2, 0, 1] - 1 or clip.balls[2, 0, 1] + 4 <= clip.pillar:  # not behind the pillar
        assert np.allclose(at - true, [[1, -1]])
    with pytest.raises(ConfigError, match="shifts"):
        world.simulate(5, 6, shifts=np.zeros((5, 3, 2)))


def test_shifted_clips_put_objects_one_pixel_off_before_the_last_frame():
    offsets, differ = [], 0
    for seed in range(30):
        true, shifted, actions = world.shifted_clip(seed, 4)
        assert np.array_equal(true, world.render_clip(seed, 4)[0]) and np.array_equal(actions, world.render_clip(seed, 4)[1])
        assert np.array_equal(true[-1], shifted[-1]), "the last frame is a target only: it stays true"
        differ += (true != shifted).any()
        for name, color in world.OBJECT_COLORS.items():
            a, seen_a = world.locate(shifted, color)
            b, seen_b = world.locate(true, color)
            both = seen_a & seen_b
            offsets.extend(np.abs(a - b)[both].max(-1).tolist())
        again = world.shifted_clip(seed, 4)
        assert all(np.array_equal(x, y) for x, y in zip(again, (true, shifted, actions)))
    offsets = np.array(offsets)
    assert differ >= 27  # at least one object drawn off in each clip (the pillar or another object may hide it)
    moved = offsets[offsets > 0.25]  # one pixel (less where the pillar or another object hides part of it)
    assert len(moved) >= 30 and np.median(moved) == 1 and (np.abs(moved - 1) < 0.2).mean() >= 0.7  # (what the pillar hides moves more)
    # in a batch the last share is shifted: its context differs from its video, the other clips' does not
    video, actions, context = next(world.stream_batches(7, 4, 4, shift_share=0.5))
    plain_video, plain_actions = next(world.stream_batches(7, 4, 4))
    assert torch.equal(video, plain_video) and torch.equal(actions, plain_actions)
    assert torch.equal(context[:2], video[:2]) and not torch.equal(context[2:], video[2:])
    assert torch.equal(context[:, -1], video[:, -1])
    seeds = world.training_seeds(7, 0, 4)
    _, shifted, _ = world.shifted_clip(int(seeds[3]), 4)
    assert torch.equal(context[3], torch.from_numpy(shifted).permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_shift_last_puts_every_slip_in_the_frame_before_the_last():
    slipped = 0
    for seed in range(20):
        true, shifted, actions = world.shifted_clip(seed, 5, last=True)
        assert np.array_equal(true, world.render_clip(seed, 5)[0])
        off = (true != shifted).any((1, 2, 3))
        assert not off[[0, 1, 2, 4]].any(), "only frame 3, the last target's newest context frame, is drawn off"
        slipped += off[3]
        assert all(np.array_equal(x, y) for x, y in zip(world.shifted_clip(seed, 5, last=True), (true, shifted, actions)))
    assert slipped >= 18  # a slip hidden by the pillar or another object can leave a frame unchanged
    video, _, context = next(world.stream_batches(7, 4, 5, shift_share=0.5, shift_last=True))
    assert torch.equal(context[:2], video[:2]) and torch.equal(context[2:, [0, 1, 2, 4]], video[2:, [0, 1, 2, 4]])
    assert not torch.equal(context[2:, 3], video[2:, 3])
    with pytest.raises(ConfigError, match="shift_share"):
        TrainSettings(shift_last=True)
    with pytest.raises(ConfigError, match="shift_weight shapes the slips of shift_share"):
        TrainSettings(shift_weight=5)


def test_slip_weights_weigh_the_frame_after_a_slip_near_it():
    true, shifted, _ = world.shifted_clip(3, 5, last=True)
    video, context = (torch.from_numpy(f[None]).permute(0, 1, 4, 2, 3).float() / 127.5 - 1 for f in (true, shifted))
    w = world.slip_weights(video, context, 9.0)
    assert w.shape == (1, 5, 1, 32, 32)
    assert (w[0, :4] == 1).all(), "only the frame after the slipped one (frame 3) is weighed up"
    off = (true[3] != shifted[3]).any(-1)
    rows, cols = np.nonzero(off)
    heavy = (w[0, 4, 0] == 10).numpy()
    assert heavy[rows, cols].all() and heavy.sum() > off.sum()  # the slip and 2 px around it, no further
    far = np.ones_like(heavy)
    far[max(rows.min() - 2, 0):rows.max() + 3, max(cols.min() - 2, 0):cols.max() + 3] = False
    assert not heavy[far].any()
    assert torch.equal(world.slip_weights(video, video, 9.0), torch.ones_like(w))


def test_pillar_clips_end_with_an_object_deep_behind_the_pillar_or_just_out():
    deep_seen = 0
    for seed in range(20):
        clip = world.simulate(seed, world.OCCLUSION_SPAN)
        behind = clip.behind_pillar()
        for j in np.nonzero(behind)[0]:  # one column of some object shows beside the pillar, counted in pixels
            columns = [b[1] for b in clip.balls[j]] + [clip.agent[j][1]]
            assert any(c - clip.pillar in (-1, 0) for c in columns)
        frames, actions = world.occlusion_clip(seed, 4, pillar=True)
        ends = [j + 1 for j in range(3, world.OCCLUSION_SPAN)
                if np.array_equal(clip.frames[j - 3:j + 1], frames) and np.array_equal(clip.actions[j - 3:j + 1], actions)]
        assert ends
        if behind[2:].any():
            assert any(behind[end - 1] or behind[end - 2] for end in ends)
            deep_seen += 1
    assert deep_seen >= 15  # most clips pass the pillar within 48 frames
    # a deep object shows one column: the agent's pixels in such a frame
    clip = world.simulate(3, 200)
    j = next(j for j in range(200) if clip.agent[j][1] - clip.pillar in (-1, 0))
    shown = (clip.frames[j] == world.AGENT_COLOR).all(-1)
    assert set(np.nonzero(shown.any(0))[0]) <= {clip.pillar - 1, clip.pillar + 3}
    # shares of a batch: occlusion clips first, then the pillar's, the rest plain; bad shares refused
    plain = next(world.stream_batches(7, 4, 4))
    mixed = next(world.stream_batches(7, 4, 4, occlusion_share=0.25, pillar_share=0.5))
    seeds = world.training_seeds(7, 0, 4)
    frames, _ = world.occlusion_clip(int(seeds[1]), 4, pillar=True)
    assert torch.equal(mixed[0][1], torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.equal(plain[0][3], mixed[0][3]) and not torch.equal(plain[0][1], mixed[0][1])
    with pytest.raises(ConfigError, match="together at most 1"):
        TrainSettings(occlusion_share=0.5, pillar_share=0.75)
