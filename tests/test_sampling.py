"""The streaming loop against straightforward recomputation, guidance, seeds and windows."""

import pytest
import torch
from conftest import random_model, stream_inputs, tiny_config

from scd.errors import ActionError, ConfigError
from scd.models import patchify, unpatchify
from scd.sampling import Rollout, generate, sigma_schedule, stream

B, F, U, K = 2, 3, 4, 3


def inputs(config, seed=1):
    return stream_inputs(config, B, F, U, seed)


def euler(velocity, x, steps):
    sig = sigma_schedule(steps)
    for k in range(steps):
        x = x + (sig[k + 1] - sig[k]) * velocity(x, (sig[k] * 1000).expand(x.shape[0]))
    return x


def scd_without_cache(model, context, actions, noise):
    """Re-encode the whole history for every frame: what the KV cache must reproduce."""
    frames = context
    for u in range(U):
        n = frames.shape[1]
        features = model.encoder(frames, actions[:, 1:n + 1])[:, -1]
        x = euler(lambda x, t: model.decoder(x, t, features, actions[:, n]), noise[:, u], K)
        frames = torch.cat([frames, x[:, None]], dim=1)
    return frames[:, F:]


def baseline_without_cache(model, context, actions, noise):
    frames = context
    p = model.config.patch_size
    for u in range(U):
        n = frames.shape[1]

        def velocity(x, t):
            seq = torch.cat([frames, x[:, None]], dim=1)
            timesteps = torch.cat([torch.full((B, n), -1.0), t[:, None]], dim=1)
            hidden = model.encode_frames(seq, timesteps, actions[:, :n + 1])
            return unpatchify(model.proj_out(hidden[:, -1:]), p, *x.shape[-2:])[:, 0]

        x = euler(velocity, noise[:, u], K)
        frames = torch.cat([frames, x[:, None]], dim=1)
    return frames[:, F:]


@pytest.mark.parametrize("combine", ["token_concat", "add", "concat", "token_concat_with_proj"])
def test_scd_kv_cache_equals_recompute(combine):
    model = random_model(tiny_config(decoder_combine=combine))
    context, actions, noise = inputs(model.config)
    with torch.inference_mode():
        expected = scd_without_cache(model, context, actions, noise)
    got = generate(model, context, U, K, conditions=actions, noise=noise)
    assert (got - expected).abs().max() < 1e-5


def test_baseline_kv_cache_equals_recompute():
    model = random_model(tiny_config(arch="baseline", layers=3))
    context, actions, noise = inputs(model.config)
    with torch.inference_mode():
        expected = baseline_without_cache(model, context, actions, noise)
    got = generate(model, context, U, K, conditions=actions, noise=noise)
    assert (got - expected).abs().max() < 1e-5


def test_chunked_prefill_equals_single_pass(monkeypatch):
    model = random_model(tiny_config())
    context, actions, noise = inputs(model.config)
    whole = generate(model, context, U, K, conditions=actions, noise=noise)
    monkeypatch.setattr("scd.models.far.PREFILL_CHUNK", 1)
    chunked = generate(model, context, U, K, conditions=actions, noise=noise)
    assert (whole - chunked).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_batched_guidance_equals_two_passes(arch):
    model = random_model(tiny_config(arch=arch))
    context, actions, noise = inputs(model.config)
    g = 2.5
    got = generate(model, context, 1, K, guidance=g, conditions=actions[:, :F + 1], noise=noise[:, :1])
    null = torch.full_like(actions[:, :F + 1], model.config.null_class)

    def velocity_for(labels):
        # one frame, one set of labels: the velocity function of an unguided pass
        if arch == "scd":
            with torch.inference_mode():
                features = model.encoder(context, labels[:, 1:F + 1])[:, -1]
            return lambda x, t: model.decoder(x, t, features, labels[:, F])
        cache = model.new_cache(B, F + 1)
        with torch.inference_mode():
            model.append(context, labels[:, :F], cache)
        return lambda x, t: model(x, t, labels[:, F], cache)

    cond, uncond = velocity_for(actions[:, :F + 1]), velocity_for(null)
    with torch.inference_mode():
        expected = euler(lambda x, t: uncond(x, t) + g * (cond(x, t) - uncond(x, t)), noise[:, 0], K)
    # float32 rounding, relative: frames reach ~13 here, whose ulp is 1e-6, and guidance 2.5 amplifies it
    assert (got[:, 0] - expected).abs().max() < 3e-6 * expected.abs().max()
    unguided = generate(model, context, 1, K, conditions=actions[:, :F + 1], noise=noise[:, :1])
    assert (got - unguided).abs().max() > 1e-3  # guidance changes the result


def test_seed_determinism_and_streaming_timings():
    model = random_model(tiny_config())
    context, actions, _ = inputs(model.config)
    a = list(stream(model, context, U, K, conditions=actions, seed=7))
    b = generate(model, context, U, K, conditions=actions, seed=7)
    c = generate(model, context, U, K, conditions=actions, seed=8)
    assert [f.index for f in a] == list(range(U))
    assert torch.equal(torch.stack([f.latents for f in a], 1), b)
    assert (b - c).abs().max() > 1e-3
    assert all(f.context_ms >= 0 and f.denoise_ms > 0 and f.latency_ms >= f.denoise_ms for f in a)


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_clamp_bounds_each_frame_and_what_is_fed_back(arch):
    model = random_model(tiny_config(arch=arch))
    context, actions, noise = inputs(model.config)
    free = generate(model, context, U, K, conditions=actions, noise=noise)
    assert free.abs().max() > 1  # random weights overshoot the pixel range
    bounded = generate(model, context, U, K, conditions=actions, noise=noise, clamp=1.0)
    assert bounded.abs().max() <= 1
    assert torch.equal(bounded[:, 0], free[:, 0].clamp(-1, 1))  # the first frame: only the bound differs
    # later frames were generated from the bounded frames, not from the free ones
    assert not torch.equal(bounded[:, 1:], free[:, 1:].clamp(-1, 1))


def test_actions_change_the_output():
    model = random_model(tiny_config())
    context, actions, noise = inputs(model.config)
    other = actions.clone()
    other[:, F:] = (other[:, F:] + 1) % model.config.num_classes
    a = generate(model, context, U, K, conditions=actions, noise=noise)
    b = generate(model, context, U, K, conditions=other, noise=noise)
    assert (a - b).abs().max() > 1e-3


def hidden_with_frame_mask(transformer, frames, timesteps, labels, visible):
    """Run a transformer's blocks over frames (B, N, C, H, W) where query frame q sees key frame k
    iff visible[q, k]: the attention a rolling KV cache should amount to."""
    c, t = transformer.config, transformer.config.tokens_per_frame
    x = transformer.x_embedder(patchify(frames, c.patch_size))
    emb = transformer.conditioning(timesteps, labels)
    rope = transformer.rope(0, frames.shape[1], frames.device)
    mask = visible.repeat_interleave(t, 0).repeat_interleave(t, 1)
    return transformer.norm_out(transformer.run_blocks(x, emb, rope, mask), emb)


def window_mask(n, w, last_sees_extra=False):
    """Frame q sees frames q-w+1..q (the ring of w slots); with last_sees_extra the last frame (the
    baseline's noisy one, in the spare slot) sees the w frames before it and itself."""
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    visible = (k <= q) & (k > q - w)
    if last_sees_extra:
        visible[-1] = (k[0] <= n - 1) & (k[0] >= n - 1 - w)
    return visible


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_rolling_window_equals_a_recompute_over_the_last_w_frames(arch):
    W = 3
    model = random_model(tiny_config(arch=arch))
    context, actions, noise = inputs(model.config)
    got = generate(model, context, U, K, conditions=actions, noise=noise, window=W)
    frames = context
    p = model.config.patch_size
    with torch.inference_mode():
        for u in range(U):
            n = frames.shape[1]
            if arch == "scd":
                clean = torch.full((B, n), -1.0)
                features = hidden_with_frame_mask(model.encoder, frames, clean, actions[:, 1:n + 1], window_mask(n, W))[:, -1]
                velocity = lambda x, t: model.decoder(x, t, features, actions[:, n])
            else:
                def velocity(x, t):
                    seq = torch.cat([frames, x[:, None]], dim=1)
                    timesteps = torch.cat([torch.full((B, n), -1.0), t[:, None]], dim=1)
                    hidden = hidden_with_frame_mask(model, seq, timesteps, actions[:, :n + 1], window_mask(n + 1, W, True))
                    return unpatchify(model.proj_out(hidden[:, -1:]), p, *x.shape[-2:])[:, 0]
            x = euler(velocity, noise[:, u], K)
            frames = torch.cat([frames, x[:, None]], dim=1)
    assert (got - frames[:, F:]).abs().max() < 1e-5
    full = generate(model, context, U, K, conditions=actions, noise=noise)
    assert (full - got).abs().max() > 1e-4  # the window did forget something
    long = list(stream(model, context, 40, 2, conditions=None, window=2))
    assert len(long) == 40 and all(torch.isfinite(f.latents).all() for f in long)


@pytest.mark.parametrize("arch", ["scd", "baseline"])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_rollout_with_actions_given_frame_by_frame_equals_the_stream(arch, guidance):
    """A live player chooses each action after seeing the previous frame: the same actions and seed
    must give the same frames as knowing them all up front."""
    model = random_model(tiny_config(arch=arch))
    context, actions, _ = inputs(model.config)
    expected = generate(model, context, U, K, guidance=guidance, conditions=actions, seed=3, window=5)
    rollout = Rollout(model, context, K, guidance=guidance, actions=actions[:, :F], seed=3, window=5)
    got = []
    for u in range(U):
        action = actions[:, F + u] if u % 2 else actions[:, F + u].tolist()  # tensor or list of ints
        got.append(rollout.step(torch.as_tensor(action)).latents)
    assert torch.equal(torch.stack(got, 1), expected)
    single = Rollout(model, context[:1], K, actions=actions[0, :F], seed=3, frames=2)
    assert single.step(int(actions[0, F])).latents.shape == (1, *context.shape[2:])
    single.step(None)  # the null action
    with pytest.raises(ConfigError, match="sized for 2 frames"):
        single.step(0)
    with pytest.raises(ActionError, match="indices must lie in"):
        Rollout(model, context, K, window=3).step(model.config.num_classes + 1)
    with pytest.raises(ConfigError, match="window .* or frames"):
        Rollout(model, context, K)


def test_bad_inputs_are_typed_errors():
    model = random_model(tiny_config())
    context, actions, noise = inputs(model.config)
    with pytest.raises(ActionError, match=r"expected 7 actions per sample \(context \+ generated frames\), got 2"):
        generate(model, context, U, K, conditions=actions[:, :2])
    with pytest.raises(ActionError, match=r"action indices must lie in 0\.\.4 \(4 = none\)"):
        generate(model, context, U, K, conditions=actions + 10)
    with pytest.raises(ConfigError, match=r"context must be \(B, F, 3, 4, 4\), got \(2, 3, 2, 4, 4\)"):
        generate(model, context[:, :, :2], U, K)
    with pytest.raises(ConfigError, match="steps must be >= 1, got 0"):
        generate(model, context, U, 0)
    unconditioned = random_model(tiny_config(condition=None, num_classes=0))
    with pytest.raises(ConfigError, match="guidance needs an action- or class-conditioned model"):
        generate(unconditioned, context, U, K, guidance=2.0)


@pytest.mark.parametrize("arch", ["scd", "baseline"])
@pytest.mark.parametrize("guidance,samples", [(1.0, 4), (2.5, 3)])
def test_samples_keep_the_median_of_one_frame_from_the_kept_history(arch, guidance, samples):
    """Each frame of a K-sample stream is the per-element median of K plain one-frame continuations
    of everything kept so far (the K noises of the frame drawn sample-major), and that median is
    what the next frame sees."""
    model = random_model(tiny_config(arch=arch))
    context, actions, _ = inputs(model.config)
    got = generate(model, context, U, K, guidance=guidance, conditions=actions, seed=5, samples=samples)
    g = torch.Generator().manual_seed(5)
    frames = context
    for u in range(U):
        n = frames.shape[1]
        noise = torch.randn(samples * B, 1, *context.shape[2:], generator=g)
        drawn = generate(model, frames.repeat(samples, 1, 1, 1, 1), 1, K, guidance=guidance,
                         conditions=actions[:, :n + 1].repeat(samples, 1), noise=noise)[:, 0]
        median = drawn.view(samples, B, *drawn.shape[1:]).sort(dim=0).values[(samples - 1) // 2]
        frames = torch.cat([frames, median[:, None]], dim=1)
    assert (got - frames[:, F:]).abs().max() < 1e-5
    one = generate(model, context, U, K, guidance=guidance, conditions=actions, seed=5)
    assert (got - one).abs().max() > 1e-3  # the median is not the first sample


def test_samples_are_checked():
    model = random_model(tiny_config())
    context, actions, noise = inputs(model.config)
    for bad, says in ((0, ">= 1 and <= 64, got 0"), (65, ">= 1 and <= 64, got 65"), (2.0, "a whole number"), (True, "a whole number")):
        with pytest.raises(ConfigError, match=f"samples must be {says}"):
            Rollout(model, context, K, window=3, samples=bad)
    with pytest.raises(ConfigError, match=r"noise must be \(4, 4, 3, 4, 4\)"):
        generate(model, context, U, K, conditions=actions, noise=noise, samples=2)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_scd_encodes_each_frame_once_for_all_its_samples(guidance):
    """The encoder of an SCD model sees each stream's frames once (B rows, 2 B with guidance); the
    decoder K samples of each; a compiled stream gives the same frames."""
    model = random_model(tiny_config())
    context, actions, _ = inputs(model.config)
    rows = {"encoder": [], "decoder": []}
    hooks = [getattr(model, part).x_embedder.register_forward_hook(lambda m, args, out, part=part: rows[part].append(args[0].shape[0]))
             for part in rows]
    eager = generate(model, context, U, K, guidance=guidance, conditions=actions, seed=2, window=3, samples=5)
    for hook in hooks:
        hook.remove()
    doubled = 2 if guidance != 1.0 else 1
    assert set(rows["encoder"]) == {B * doubled} and len(rows["encoder"]) >= U
    assert set(rows["decoder"]) == {5 * B * doubled} and len(rows["decoder"]) == U * K
    compiled = generate(model, context, U, K, guidance=guidance, conditions=actions, seed=2, window=3, samples=5,
                        compiled="aot_eager")
    assert (compiled - eager).abs().max() < 1e-4
