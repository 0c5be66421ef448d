"""Analytic FLOPs per frame against counted matmuls."""

import pytest
import torch
from conftest import random_model, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from scd.flops import block_flops, frame_flops


def flop_logged(calls: list, name: str, call):
    """`call`, appending (name, the FLOPs the counter saw) to `calls` each time it runs."""
    def wrapped(*args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            out = call(*args, **kwargs)
        calls.append((name, counter.get_total_flops()))
        return out
    return wrapped


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("combine", ["token_concat", "add"])
def test_frame_flops_match_counted_matmuls(combine):
    """flops.py against torch's own count of one encoder pass, decoder step and baseline step."""
    config = tiny_config(num_heads=4, head_dim=16, rope_axes=(4, 6, 6), latent_size=(8, 8), decoder_combine=combine)
    scd, base = random_model(config), random_model(config.matched())
    context, t = 5, config.tokens_per_frame
    x = torch.randn(1, config.channels, 8, 8)
    cache = scd.encoder.new_cache(1, 8)
    scd.encoder(torch.randn(1, context, config.channels, 8, 8), None, cache)
    labels = torch.zeros(1, 1, dtype=torch.long)
    encoder = counted(lambda: scd.encoder(x[:, None], labels, cache))
    features = torch.randn(1, t, config.width)
    decoder = counted(lambda: scd.decoder(x, torch.full((1,), 500.0), features, labels[:, 0]))
    bcache = base.new_cache(1, 8)
    base.append(torch.randn(1, context, config.channels, 8, 8), None, bcache)
    step = counted(lambda: base(x, torch.full((1,), 500.0), labels[:, 0], bcache))
    predicted = frame_flops(config, context, steps=1, tabulated=False)  # direct calls condition per call
    # torch's counter does not see the CPU attention kernel: add its 4 S S_kv D per layer by hand
    d, le, ld, lb = config.width, config.encoder_layers, config.decoder_layers, config.layers
    s = 2 * t if combine == "token_concat" else t
    attention = {"encoder": le * 4 * t * (context + 1) * t * d, "decoder": ld * 4 * s * s * d,
                 "baseline": lb * 4 * t * (context + 1) * t * d}
    assert abs(predicted.context - (encoder + attention["encoder"])) / predicted.context < 0.05
    assert abs(predicted.denoise - (decoder + attention["decoder"])) / predicted.denoise < 0.05
    base_step = frame_flops(config.matched(), context, steps=1, tabulated=False).denoise
    assert abs(base_step - (step + attention["baseline"])) / base_step < 0.05


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_attention_sinks_are_one_more_cached_frame_per_sink(arch):
    plain = tiny_config(arch=arch, num_heads=4, head_dim=16, rope_axes=(4, 6, 6), latent_size=(8, 8), window=4)
    sinks = tiny_config(arch=arch, num_heads=4, head_dim=16, rope_axes=(4, 6, 6), latent_size=(8, 8), window=4,
                        sink_frames=2)
    assert frame_flops(sinks, 4, steps=3) == frame_flops(plain, 6, steps=3)
    assert frame_flops(sinks, 4, steps=3).total > frame_flops(plain, 4, steps=3).total


def test_block_flops_formula():
    assert block_flops(8, 2, 6, conditionings=0) == 24 * 2 * 64 + 4 * 2 * 6 * 8


def wan_config(**overrides):
    from scd.models import WanConfig

    sizes = dict(dim=32, ffn_dim=48, freq_dim=16, num_heads=2, num_layers=2, text_dim=24, text_len=6, channels=4,
                 latent_size=(4, 6), frame_size=(32, 48), chunk_frames=2)
    return WanConfig(**{**sizes, **overrides})


@pytest.mark.parametrize("window", [None, (5, 1)])
def test_wan_chunk_flops_equal_counted_stream_steps(window):
    """flops.py's Wan count is exactly what torch counts for each chunk a stream makes: the step
    that starts chunk j >= 1 runs the clean pass of chunk j - 1 (N = (j - 1) n frames cached before
    it) and the K steps; the text's keys and values are made once, when the stream starts. With a
    window the cache (and so the count) stops growing at local_attn_size frames."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scd.flops import chunk_flops, matched_config, wan_text_flops
    from scd.models import build_model
    from scd.sampling import Rollout

    local, sinks = window or (None, 0)
    config = wan_config(local_attn_size=local, sink_size=sinks)
    torch.manual_seed(0)
    model = build_model(config).eval()
    n, steps, chunks = config.chunk_frames, 3, 5
    text = torch.randn(1, config.text_len, config.text_dim)
    context = torch.zeros(1, 0, config.channels, *config.latent_size)
    calls = []  # (what, flops) of every prepare and velocity call

    model.prepare = flop_logged(calls, "context", model.prepare)
    model.velocity = flop_logged(calls, "denoise", model.velocity)
    with sdpa_kernel(SDPBackend.MATH):  # attention as bmm, which the counter sees
        start = counted(lambda: Rollout(model, context, steps, frames=n * chunks, text=text))
        rollout = Rollout(model, context, steps, frames=n * chunks, text=text)
        totals = []
        for j in range(chunks):
            calls.clear()
            totals.append(counted(rollout.step))
            for _ in range(n - 1):
                assert counted(rollout.step) == 0  # the rest of the chunk is handed out, not computed
            if j:
                predicted = chunk_flops(config, (j - 1) * n, steps)
                assert predicted.frames == n
                assert predicted.context == sum(f for what, f in calls if what == "context")
                assert predicted.denoise == sum(f for what, f in calls if what == "denoise")
                assert predicted.total == totals[j]
    assert start == wan_text_flops(config)
    assert matched_config(config) is None  # no SCD counterpart to compare with
    if window:  # the cache is full from the third chunk on: every later chunk costs the same
        assert totals[3] == totals[4] and chunk_flops(config, 3 * n, steps) == chunk_flops(config, 30 * n, steps)
    else:
        assert totals[3] < totals[4]


def test_wan_chunk_flops_formula():
    """One block by hand: q, k, v, o + attention over the keys, cross-attention's q, o + attention
    over the text, the FFN; once per pass the time embedding of each frame, patch embed and head."""
    from scd.flops import wan_pass_flops

    c = wan_config(num_layers=1)
    s, d, f, t = 2 * 6, 32, 48, 6  # a chunk of 2 frames of 2 x 3 tokens
    block = 8 * s * d * d + 4 * s * (3 * t) * d + 4 * s * d * d + 4 * s * 6 * d + 4 * s * d * f
    time = 2 * (2 * 16 * d + 2 * d * d + 12 * d * d)
    assert wan_pass_flops(c, 2, 3) == block + time + 2 * 2 * s * d * 16


def test_far_chunk_is_its_frame():
    from scd.flops import chunk_flops, matched_config

    config = tiny_config(num_heads=4, head_dim=16, rope_axes=(4, 6, 6), latent_size=(8, 8))
    f = frame_flops(config, 5, 3)
    chunk = chunk_flops(config, 5, 3)
    assert (chunk.frames, chunk.context, chunk.denoise) == (1, f.context, f.denoise)
    assert matched_config(config) == config.matched()


@pytest.mark.parametrize("combine,encoder_input,window", [("token_concat", "noise", None), ("add", "noise", (5, 1)),
                                                          ("token_concat", "none", None)])
def test_scd_wan_chunk_flops_equal_counted_stream_steps(combine, encoder_input, window):
    """SCD-Wan's count is exactly torch's for each chunk of a stream: `context` the encoder's clean
    pass of the previous chunk (prepare) and, encoder input "noise", its pass of the new chunk's
    noise (the first step's features); `denoise` the K decoder steps, each frame alone; the text's
    keys and values of both parts once, at the start. Under a window every chunk from the cache's
    filling on costs the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scd.flops import chunk_flops, wan_text_flops
    from scd.models import build_model
    from scd.sampling import Rollout

    local, sinks = window or (None, 0)
    config = wan_config(arch="scd", num_layers=3, encoder_layers=2, decoder_layers=1, decoder_combine=combine,
                        encoder_input=encoder_input, local_attn_size=local, sink_size=sinks)
    torch.manual_seed(0)
    model = build_model(config).eval()
    n, steps, chunks = config.chunk_frames, 3, 5
    text = torch.randn(1, config.text_len, config.text_dim)
    # encoder input "none" reads the previous chunk's features: start from a prompt chunk
    context = torch.randn(1, n if encoder_input == "none" else 0, config.channels, *config.latent_size)
    given = context.shape[1]
    calls = []

    model.prepare = flop_logged(calls, "context", model.prepare)
    model.features = flop_logged(calls, "context", model.features)
    model.decode = flop_logged(calls, "denoise", model.decode)
    with sdpa_kernel(SDPBackend.MATH):
        start = counted(lambda: Rollout(model, context, steps, frames=n * chunks, text=text))
        rollout = Rollout(model, context, steps, frames=n * chunks, text=text)
        totals = []
        for j in range(chunks):
            calls.clear()
            totals.append(counted(rollout.step))
            for _ in range(n - 1):
                assert counted(rollout.step) == 0
            if j or given:
                predicted = chunk_flops(config, given + (j - 1) * n, steps)
                assert predicted.context == sum(f for what, f in calls if what == "context")
                assert predicted.denoise == sum(f for what, f in calls if what == "denoise")
                assert predicted.total == totals[j]
                assert sum(what == "denoise" for what, _ in calls) == steps
    assert start == wan_text_flops(config)
    if window:
        assert totals[3] == totals[4] and chunk_flops(config, 3 * n, steps) == chunk_flops(config, 30 * n, steps)
    else:
        assert totals[3] < totals[4]


def test_scd_wan_is_matched_with_the_causal_wan_it_came_from():
    """The matched config of SCD-Wan: a causal Wan of its source depth (recorded blocks, else the
    paper's proportions), the same sizes; its FLOPs are the causal count of that depth."""
    from scd.flops import chunk_flops, matched_config, wan_source_depth

    paper = wan_config(arch="scd", num_layers=35, encoder_layers=25, decoder_layers=10)
    base = matched_config(paper)
    assert (base.arch, base.num_layers, base.encoder_layers, base.decoder_layers, base.dim) == ("baseline", 30, 0, 0, 32)
    assert matched_config(base) is None  # a causal Wan does not know how it would be split
    recorded = wan_config(arch="scd", num_layers=4, encoder_layers=2, decoder_layers=2,
                          source_blocks=((0, 1), (0, 5)))
    assert wan_source_depth(recorded) == 6 and matched_config(recorded).num_layers == 6
    assert chunk_flops(base, 4, 3) == chunk_flops(wan_config(num_layers=30), 4, 3)
    # SCD's decoder runs 10 of 30 blocks a step: far fewer FLOPs per chunk than the causal 30
    assert chunk_flops(paper, 4, 4).denoise < chunk_flops(base, 4, 4).denoise
