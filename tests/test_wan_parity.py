"""The Wan family against Self-Forcing's own pipeline (`tests/fixtures/reference/sfwan*`, see its
README): every such folder, whatever its sizes, step list, window, sinks and initial latent, is
reproduced to float32 rounding through `load_wan` and `scd.sampling.stream`. And the loader of
diffusers' names against diffusers' `WanTransformer3DModel` itself."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scd.errors import CheckpointError
from scd.sampling import generate, stream
from scd.wan_reference import load_wan

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
FOLDERS = sorted(p.name for p in FIXTURES.glob("sfwan*") if p.is_dir())
TOLERANCE = 1e-4


def test_there_are_wan_fixtures():
    assert {"sfwan0", "sfwan1"} <= set(FOLDERS)
    for name in FOLDERS:
        assert (FIXTURES / name / "case.safetensors").is_file(), f"{name} has no case.safetensors"


def load_case(name: str, weights: str = "generator.pt"):
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    case = load_file(str(folder / "case.safetensors"))
    size = (config["case"]["latent_height"], config["case"]["latent_width"])
    model = load_wan(folder / weights, latent_size=size, frame_size=(8 * size[0], 8 * size[1])).eval()
    return model, config, case


def fixture_draws(config: dict, case: dict) -> torch.Tensor:
    """The recorded re-noising draws as (chunks, K - 1, B, n, C, H, W)."""
    c, pipeline = config["case"], config["pipeline"]
    b, n, k = c["batch_size"], pipeline["num_frame_per_block"], len(pipeline["timesteps"])
    chunks = len(pipeline["chunk_frames"])
    draws = [case[f"draws_{i:03d}"] for i in range(chunks * (k - 1))]
    return torch.stack(draws).view(chunks, k - 1, b, n, *draws[0].shape[1:])


@pytest.mark.parametrize("name", FOLDERS)
def test_single_call_matches(name):
    model, config, case = load_case(name)
    with torch.inference_mode():
        state = model.start(case["prompt_embeds"].shape[0], 16, text=case["prompt_embeds"],
                            latent_size=tuple(case["call_input"].shape[-2:]))
        flow = model.velocity(state, case["call_input"], case["call_timestep"][:, 0])
    assert (flow - case["call_flow_pred"]).abs().max() < TOLERANCE


@pytest.mark.parametrize("weights", ["generator.pt", "model.safetensors"])
@pytest.mark.parametrize("name", FOLDERS)
def test_streamed_generation_matches(name, weights):
    model, config, case = load_case(name, weights)
    initial = case.get("initial_latent")
    noise = case["noise"]
    b, frames = noise.shape[:2]
    context = initial if initial is not None else noise.new_zeros((b, 0, *noise.shape[2:]))
    steps = len(config["pipeline"]["timesteps"])
    got = generate(model, context, frames, steps, noise=noise, draws=fixture_draws(config, case),
                   text=case["prompt_embeds"])
    expected = case["generated"][:, context.shape[1]:]
    assert got.shape == expected.shape
    error = (got - expected).abs().max().item()
    assert error < TOLERANCE, f"{name}: {error:.2e}"


@pytest.mark.parametrize("name", FOLDERS)
def test_chunks_arrive_whole_with_their_times(name):
    """A chunk's frames come out of one step of the stream: the first carries its times."""
    model, config, case = load_case(name)
    n = config["pipeline"]["num_frame_per_block"]
    noise = case["noise"]
    context = noise.new_zeros((noise.shape[0], 0, *noise.shape[2:]))
    frames = list(stream(model, context, 2 * n, len(config["pipeline"]["timesteps"]), text=case["prompt_embeds"], seed=3))
    assert [f.chunk_start for f in frames] == ([True] + [False] * (n - 1)) * 2
    assert all(f.latency_ms > 0 for f in frames if f.chunk_start)
    assert all(f.latency_ms == 0 for f in frames if not f.chunk_start)
    again = list(stream(model, context, 2 * n, len(config["pipeline"]["timesteps"]), text=case["prompt_embeds"], seed=3))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(frames, again))  # a seed reproduces


def test_rolling_window_keeps_memory_flat():
    """A model with a window streams far past it; its cache never grows."""
    model, config, case = load_case("sfwan1")
    window = model.config.local_attn_size
    noise = case["noise"]
    context = noise.new_zeros((1, 0, *noise.shape[2:]))
    rollout_frames = list(stream(model, context, 5 * window, 4, text=case["prompt_embeds"], window=window, seed=1))
    assert len(rollout_frames) == 5 * window and all(torch.isfinite(f.latents).all() for f in rollout_frames)
    state = model.start(1, 1000, text=case["prompt_embeds"], latent_size=tuple(noise.shape[-2:]))
    assert state.family.caches[0].keys.shape[2] == window * state.family.stream.tokens_per_frame


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    folder = FIXTURES / "sfwan0"
    tensors = load_file(str(folder / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    from safetensors.torch import save_file

    broken = dict(tensors)
    del broken["blocks.1.cross_attn.k.weight"]
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="blocks.1.cross_attn.k.weight"):
        load_wan(tmp_path / "model.safetensors")
    broken = dict(tensors)
    broken["head.modulation"] = torch.zeros(1, 3, 48)
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="head.modulation"):
        load_wan(tmp_path / "model.safetensors")


def test_sizes_come_from_a_config(tmp_path):
    """Heads cannot be read off the tensors: without a config beside the weights or a base, one line."""
    from safetensors.torch import save_file

    save_file(load_file(str(FIXTURES / "sfwan0" / "model.safetensors")), str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="base model folder"):
        load_wan(tmp_path / "w.safetensors")


def test_diffusers_naming_matches_wan_transformer_3d_model(tmp_path):
    """A diffusers `transformer/` folder loads under Wan's names and computes what diffusers'
    WanTransformer3DModel computes (bidirectional, one call)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24,
                                                in_channels=4, out_channels=4, text_dim=32, freq_dim=64, ffn_dim=64,
                                                num_layers=2).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))  # nothing left at its zero or unit initial value
    reference.save_pretrained(tmp_path / "base" / "transformer")
    latents = torch.randn(2, 4, 3, 6, 8)  # (B, C, F, H, W), diffusers' layout
    text = torch.randn(2, 7, 32)
    timestep = torch.tensor([937.5, 250.0])
    with torch.no_grad():
        expected = reference(latents, timestep, text).sample
    model = load_wan(tmp_path / "base" / "transformer", text_len=7, latent_size=(6, 8), frame_size=(48, 64)).eval()
    with torch.no_grad():
        got = model(latents.transpose(1, 2), timestep, text).transpose(1, 2)
    assert (got - expected).abs().max() < TOLERANCE
