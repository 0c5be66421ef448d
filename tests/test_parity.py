"""Parity with the reference implementations: their weights reproduce their fixtures to float32 rounding.

Every folder under tests/fixtures/reference with a case.safetensors becomes a test of its kind (the
name without its number: case, far, fardcae, farlabel, casecfgdec); drop in another folder of a
kind and it is tested with no code change.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scd.reference import load_reference
from scd.sampling import generate

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
TOL = 1e-4


def cases(kind: str) -> list[str]:
    return sorted(p.name for p in REFERENCE.iterdir()
                  if re.fullmatch(rf"{kind}\d+", p.name) and (p / "case.safetensors").exists())


SCD_CASES, FAR_CASES = cases("case"), cases("far")
DCAE_CASES, LABEL_CASES, DECODER_CFG_CASES = cases("fardcae"), cases("farlabel"), cases("casecfgdec")


def load_case(name, latent_size=True):
    """Settings, tensors and the loaded model; the latent size from the tensors unless the options
    give it (`latent_size=False`: the options file alone, as a user runs it)."""
    folder = REFERENCE / name
    settings = json.loads((folder / "case.json").read_text())
    tensors = load_file(str(folder / "case.safetensors"))
    weights = next(p for p in folder.glob("*.pth") if p.name != "dcae.pth")
    size = tuple(tensors["init_noise"].shape[-2:]) if latent_size else None
    loaded = load_reference(weights, folder / "options.yml", latent_size=size)
    return settings, tensors, loaded


def model_space_context(settings, tensors):
    context = tensors["context"]
    return context if settings.get("latent_space") else context * 2 - 1


def test_fixture_folders_found():
    assert len(SCD_CASES) >= 4 and len(FAR_CASES) >= 2
    assert len(DCAE_CASES) >= 2 and len(LABEL_CASES) >= 2 and len(DECODER_CFG_CASES) >= 2


@pytest.mark.parametrize("name", SCD_CASES)
def test_encoder_features(name):
    settings, t, loaded = load_case(name)
    context = model_space_context(settings, t)
    f = context.shape[1]
    actions = t["actions"][:, 1:f + 1] if "actions" in t else None
    with torch.inference_mode():
        features = loaded.model.encoder(context, actions)  # (B, F, T, D), no cache
    err = (features.flatten(1, 2) - t["encoder_features"]).abs().max().item()
    assert err < TOL, f"encoder features differ by {err}"


@pytest.mark.parametrize("name", SCD_CASES)
def test_decoder_velocity(name):
    settings, t, loaded = load_case(name)
    f = t["context"].shape[1]
    features = t["encoder_features"].unflatten(1, (f, -1))[:, -1]
    labels = t["actions"][:, f] if "actions" in t else None
    timestep = torch.full((features.shape[0],), settings["decoder_timestep"])
    with torch.inference_mode():
        velocity = loaded.model.decoder(t["decoder_input"][:, 0], timestep, features, labels)
    err = (velocity - t["decoder_velocity"][:, 0]).abs().max().item()
    assert err < TOL, f"decoder velocity differs by {err}"


@pytest.mark.parametrize("name", SCD_CASES + FAR_CASES)
def test_generated(name):
    settings, t, loaded = load_case(name)
    context = model_space_context(settings, t)
    out = generate(loaded.model, context, settings["frames_generated"], settings["steps"],
                   guidance=settings["guidance_scale"], conditions=t.get("actions"), noise=t["init_noise"])
    err = (out - t["generated"]).abs().max().item()
    assert err < TOL, f"generated frames differ by {err}"


@pytest.mark.parametrize("name", DCAE_CASES)
def test_far_with_its_dcae_in_pixels(name):
    """Pixels in, pixels out, from the options file alone: its vae section, context length,
    guidance and steps are the model's."""
    settings, t, loaded = load_case(name, latent_size=False)
    c = loaded.config
    assert (c.frame_size, c.context_frames, c.default_guidance, c.default_steps) == (
        (settings["resolution"],) * 2, settings["frames_context"], settings["guidance_scale"], settings["steps"])
    b, f = t["context"].shape[:2]
    latents = loaded.encode(t["context"].flatten(0, 1) * 2 - 1).unflatten(0, (b, f))
    err = (latents - t["context_latents"]).abs().max().item()
    assert err < TOL, f"encoded context differs by {err}"
    out = generate(loaded.model, latents, settings["frames_generated"], c.default_steps,
                   guidance=c.default_guidance, conditions=t.get("actions"), noise=t["init_noise"])
    err = (out - t["generated"]).abs().max().item()
    assert err < TOL, f"generated latents differ by {err}"
    pixels = loaded.decode(torch.cat([latents, out], 1).flatten(0, 1)).unflatten(0, (b, -1))
    err = ((pixels / 2 + 0.5).clamp(0, 1) - t["decoded"]).abs().max().item()
    assert err < TOL, f"decoded pixels differ by {err}"


@pytest.mark.parametrize("name", LABEL_CASES)
def test_far_class_labels_with_and_without_context(name):
    settings, t, loaded = load_case(name, latent_size=False)
    assert (loaded.config.condition, loaded.config.num_classes) == ("label", settings["num_classes"])
    assert loaded.config.context_frames == settings["frames_context"]
    b, _, c, h, w = t["init_noise"].shape
    context = t["context"] if "context" in t else torch.zeros(b, 0, c, h, w)  # 0 frames: from pure noise
    out = generate(loaded.model, context, settings["frames_generated"], settings["steps"],
                   guidance=settings["guidance_scale"], conditions=t["labels"], noise=t["init_noise"])
    err = (out - t["generated"]).abs().max().item()
    assert err < TOL, f"generated frames differ by {err}"


@pytest.mark.parametrize("name", DECODER_CFG_CASES)
def test_official_decoder_guidance(name):
    """`cfg_type: decoder`: both halves keep the actions; the unconditional half's encoder features
    are noised (the recorded draws injected, scaled by the strength the pipeline used)."""
    settings, t, loaded = load_case(name, latent_size=False)
    c = loaded.config
    assert (c.guidance_mode, c.default_guidance) == ("decoder", settings["guidance_scale"])
    assert max(c.encoder_noise, 0.05) == settings["uncond_noise_strength"]
    kwargs = dict(guidance=c.default_guidance, conditions=t.get("actions"), noise=t["init_noise"])
    out = generate(loaded.model, t["context"] * 2 - 1, settings["frames_generated"], c.default_steps,
                   feature_noise=t["uncond_noise"].transpose(0, 1), **kwargs)
    err = (out - t["generated"]).abs().max().item()
    assert err < TOL, f"generated frames differ by {err}"
    # the noise matters: other draws give other frames
    other = generate(loaded.model, t["context"] * 2 - 1, settings["frames_generated"], c.default_steps, **kwargs)
    assert (other - t["generated"]).abs().max().item() > 1e-3
