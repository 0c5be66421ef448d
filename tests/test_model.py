"""The models: configs, the streaming protocol both speak, the losses each owns, and the fast paths:
fused q/k/v behind the references' state-dict names, conditioning tabulated per frame."""

import json

import pytest
import torch
from conftest import random_model, tiny_config
from safetensors.torch import load_file

from scd.checkpoints import load_model, save_model_folder
from scd.codecs import CodecConfig
from scd.errors import ConfigError
from scd.flow import add_noise, noised_context
from scd.models import ModelConfig, Objective, build_model, default_rope_axes, patchify
from scd.sampling import sigma_schedule

WORLD = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8, demo="world")


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


def test_baseline_training_reads_noised_context_only_when_asked():
    config = tiny_config(arch="baseline", **WORLD)
    model = build_model(config)
    with torch.no_grad():  # not the zeroed output layers of a new model, which ignore their input
        for p in model.parameters():
            p.normal_(0, 0.2)
    video = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    seen = []
    model.x_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    clean_tokens = patchify(video, config.patch_size)
    torch.manual_seed(0)
    clean = model.loss(video, None, Objective())
    assert torch.equal(seen[-1][:, :4], clean_tokens)  # [context; noisy]: the context as given
    torch.manual_seed(0)
    assert torch.equal(model.loss(video, None, Objective(clean_context_ratio=1.0, context_sigma_max=0.3)), clean)
    torch.manual_seed(0)
    noised = model.loss(video, None, Objective(clean_context_ratio=0.0, context_sigma_max=0.3))
    context = seen[-1][:, :4]
    assert not torch.equal(context, clean_tokens) and (context - clean_tokens).abs().mean() < 0.3  # sigma <= 0.3
    assert torch.equal(seen[-1][:, 4:], seen[0][:, 4:])  # the frames to denoise drew the same noise
    assert noised != clean


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


def test_config_round_trips_through_json_with_a_typed_codec():
    config = tiny_config(codec={"type": "dcae", "scaling_factor": 0.5, "downsample": 8})
    assert config.codec == CodecConfig("dcae", 0.5, 8)
    data = json.loads(config.to_json())
    assert data["codec"] == {"type": "dcae", "scaling_factor": 0.5, "downsample": 8}
    assert ModelConfig.from_dict(data) == config
    assert json.loads(tiny_config().to_json())["codec"] == {"type": "pixel"}  # unset fields stay out
    with pytest.raises(ConfigError, match="scaling_factor must be a positive number"):
        tiny_config(codec={"type": "dcae", "scaling_factor": float("nan")})


@pytest.mark.parametrize("head_dim, axes", [(64, (16, 24, 24)), (16, (4, 6, 6)), (32, (8, 12, 12)), (24, (8, 8, 8)), (6, (2, 2, 2))])
def test_one_rope_split_for_every_head_dim(head_dim, axes):
    assert default_rope_axes(head_dim) == axes and sum(axes) == head_dim and all(a % 2 == 0 for a in axes)


def test_rope_split_refuses_odd_or_tiny_head_dims():
    for bad in (7, 4, 0):
        with pytest.raises(ConfigError, match="head_dim"):
            default_rope_axes(bad)


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_both_models_speak_the_protocol(arch):
    model = random_model(tiny_config(arch=arch))
    state = model.start(batch=2, capacity=5)
    cache = state.cache
    assert model.cache_bytes(2, 5, torch.float32) == sum(k.numel() for k in cache.keys) * 4 * 2  # a buffer per layer
    assert set(model.parts()) == ({"encoder", "decoder"} if arch == "scd" else {"model"})
    c = model.config
    frames = torch.randn(2, 3, c.channels, *c.latent_size)
    model.observe(state, frames, torch.zeros(2, 3, dtype=torch.long))
    assert cache.frames == 0  # observed frames wait for the next action
    model.prepare(state, torch.ones(2, dtype=torch.long))
    assert cache.frames == 3 and not state.pending
    v = model.velocity(state, torch.randn(2, c.channels, *c.latent_size), torch.full((2,), 500.0))
    assert v.shape == (2, c.channels, *c.latent_size) and torch.isfinite(v).all()


def test_state_dict_keeps_the_reference_names_and_loads_them(tmp_path):
    model = random_model(tiny_config())
    state = model.state_dict()
    assert "encoder.transformer_blocks.0.attn.to_q.weight" in state and "decoder.transformer_blocks.0.attn.to_v.bias" in state
    assert not any("to_qkv" in k for k in state)
    block = model.encoder.transformer_blocks[0].attn
    d = block.heads * block.head_dim
    assert torch.equal(state["encoder.transformer_blocks.0.attn.to_k.weight"], block.to_qkv.weight[d:2 * d])
    # on disk: the reference names; loaded back: the same fused weights
    folder = save_model_folder(model, tmp_path / "m")
    assert "encoder.transformer_blocks.1.attn.to_v.weight" in load_file(str(folder / "model.safetensors"))
    loaded = load_model(str(folder)).model
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    # a reference-style dict with separate q, k, v loads strictly
    other = build_model(tiny_config(), init=False)
    other.load_state_dict(state)
    assert torch.equal(other.encoder.transformer_blocks[0].attn.to_qkv.bias, block.to_qkv.bias)


def test_training_through_the_fused_projection():
    model = random_model(tiny_config()).train()
    video = torch.randn(2, 3, 3, 4, 4)
    actions = torch.randint(0, 4, (2, 3))
    model.loss(video, actions, Objective()).backward()
    grad = model.decoder.transformer_blocks[0].attn.to_qkv.weight.grad
    d = model.config.width
    assert all(part.abs().sum() > 0 for part in grad.chunk(3))  # q, k and v all learn
    assert d * 3 == grad.shape[0]


def test_stream_conditioning_tables_equal_per_frame_conditioning(monkeypatch):
    """A stream's conditioning tables (every condition's modulation, made once) give the frames
    that conditioning made per frame gives, for both models, actions, labels and no condition."""
    from scd.models import far as model_module
    from scd.sampling import Rollout, generate

    for arch, condition in (("scd", "action"), ("baseline", "action"), ("scd", "label"), ("baseline", None)):
        model = random_model(tiny_config(arch=arch, condition=condition, num_classes=4 if condition else 1))
        context = torch.randn(2, 3, 3, 4, 4)
        kwargs = dict(conditions=torch.tensor([[0, 1, 4, 2, 3], [3, 4, 0, 0, 1]])) if condition == "action" else {}
        label = {"conditions": torch.tensor([1, 4])} if condition == "label" else {}
        tabled = generate(model, context, 2, 3, seed=1, window=2, **kwargs, **label)
        monkeypatch.setattr(model_module, "TABLE_BYTES", 0)  # no table fits: conditioning per frame
        direct = generate(model, context, 2, 3, seed=1, window=2, **kwargs, **label)
        monkeypatch.undo()
        assert (tabled - direct).abs().max() < 1e-5, (arch, condition)
    rollout = Rollout(model, context, 3, window=2)
    rollout.step()
    made = [table for _, table in rollout.state.tables.values()]
    assert len(made) == 2 and all(t is not None for t in made)  # steps and clean frames


def test_tabulated_conditioning_equals_per_call_conditioning():
    """velocity(step=k) after prepare(timesteps) is velocity(timesteps[k]) without the table."""
    for arch in ("scd", "baseline"):
        model = random_model(tiny_config(arch=arch))
        timesteps = sigma_schedule(3)[:-1] * 1000.0
        condition = torch.tensor([1, 4])  # an action and the null action
        with torch.inference_mode():
            state = model.start(2, 4)
            model.observe(state, torch.randn(2, 2, 3, 4, 4), torch.tensor([[0, 1], [2, 3]]))
            model.prepare(state, condition, timesteps)
            x = torch.randn(2, 3, 4, 4)
            for k in range(3):
                tabulated = model.velocity(state, x, None, step=k)
                direct = model.velocity(state, x, timesteps[k].expand(2))
                assert (tabulated - direct).abs().max() < 1e-5, (arch, k)


def test_one_frames_rotary_tables_come_from_a_block_and_equal_made_ones(monkeypatch):
    """A stream's per-frame rotary tables are views into tables made for a block of positions at
    once: the same numbers as made for that frame alone, across block edges and dtype changes."""
    from scd.models import far as model_module
    from scd.models import rope_tables

    encoder = random_model(tiny_config()).encoder
    c = encoder.config
    monkeypatch.setattr(model_module, "ROPE_BLOCK_BYTES", 3 * 2 * c.tokens_per_frame * c.head_dim * 4)  # 3 frames a block
    rows, cols = c.latent_size[0] // c.patch_size, c.latent_size[1] // c.patch_size
    for dtype in (torch.float32, torch.float64):
        encoder.to(dtype)
        with torch.inference_mode():
            for position in (0, 2, 3, 7, 2):
                cos, sin = encoder.rope(position, 1, "cpu")
                made = rope_tables(torch.tensor([position]), rows, cols, c.rope_axes)
                assert cos.dtype == dtype and torch.equal(cos, made[0].to(dtype)) and torch.equal(sin, made[1].to(dtype))
    assert encoder._rope_block[0][2] == 0  # the block of the last position asked for
