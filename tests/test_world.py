import numpy as np
import pytest
import torch

from scd import world
from scd.errors import ConfigError
from scd.metrics import mean_psnr, psnr, ssim, uint8_to_unit


def test_deterministic_and_actions_matter_only_forward():
    frames, actions = world.render_clip(11, 40)
    again, _ = world.render_clip(11, 40, actions)
    assert np.array_equal(frames, again)
    other = actions.copy()
    other[20:] = np.where(other[20:] == 0, 1, 0)
    changed, _ = world.render_clip(11, 40, other)
    assert np.array_equal(changed[:20], frames[:20])
    assert not np.array_equal(changed[20:], frames[20:])


def test_agent_moves_with_actions_and_balls_stay_inside():
    frames, _ = world.render_clip(3, 500)
    assert frames.shape == (500, 32, 32, 3) and frames.dtype == np.uint8
    white = (frames == world.AGENT_COLOR).all(-1)
    right, _ = world.render_clip(3, 6, np.array([4, 3, 3, 3, 3, 3]))
    cols = [np.nonzero((f == world.AGENT_COLOR).all(-1).any(0))[0] for f in right]
    visible = [c for c in cols if len(c)]
    assert len(visible) >= 2 and visible[-1].min() >= visible[0].min()
    assert white.any()


def test_batches_resume_exactly_and_heldout_is_disjoint():
    a = world.stream_batches(5, 2, 4)
    next(a)
    second = next(a)
    resumed = next(world.stream_batches(5, 2, 4, start_step=1))
    assert torch.equal(second[0], resumed[0]) and torch.equal(second[1], resumed[1])
    assert second[0].shape == (2, 4, 3, 32, 32) and second[0].min() >= -1 and second[0].max() <= 1
    assert world.HELDOUT_SEED_START > 0


def test_bad_arguments():
    with pytest.raises(ConfigError):
        world.render_clip(1, 0)
    with pytest.raises(ConfigError):
        world.render_clip(1, 3, np.array([0, 9, 1]))


def test_psnr_known_values():
    a = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 0.8 + 0.1
    assert torch.isinf(psnr(a, a)).all()
    assert mean_psnr(a, a) == 100.0
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
