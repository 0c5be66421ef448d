"""Parity with the reference implementations: their weights reproduce their fixtures to float32 rounding.

Every folder under tests/fixtures/reference with a case.safetensors becomes a test; drop in another
folder and it is tested with no code change.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scd.reference import load_reference
from scd.sampling import generate

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
TOL = 1e-4
SCD_CASES = sorted(p.name for p in REFERENCE.glob("case*") if (p / "case.safetensors").exists())
FAR_CASES = sorted(p.name for p in REFERENCE.glob("far*") if (p / "case.safetensors").exists())


def load_case(name):
    folder = REFERENCE / name
    settings = json.loads((folder / "case.json").read_text())
    tensors = load_file(str(folder / "case.safetensors"))
    weights = next(folder.glob("*.pth"))
    size = tuple(tensors["context"].shape[-2:])
    loaded = load_reference(weights, folder / "options.yml", latent_size=size)
    return settings, tensors, loaded.model


def model_space_context(settings, tensors):
    context = tensors["context"]
    return context if settings.get("latent_space") else context * 2 - 1


def test_fixture_folders_found():
    assert len(SCD_CASES) >= 4 and len(FAR_CASES) >= 2


@pytest.mark.parametrize("name", SCD_CASES)
def test_encoder_features(name):
    settings, t, model = load_case(name)
    context = model_space_context(settings, t)
    f = context.shape[1]
    actions = t["actions"][:, 1:f + 1] if "actions" in t else None
    with torch.inference_mode():
        features = model.encoder(context, actions)  # (B, F, T, D), no cache
    err = (features.flatten(1, 2) - t["encoder_features"]).abs().max().item()
    assert err < TOL, f"encoder features differ by {err}"


@pytest.mark.parametrize("name", SCD_CASES)
def test_decoder_velocity(name):
    settings, t, model = load_case(name)
    f = t["context"].shape[1]
    features = t["encoder_features"].unflatten(1, (f, -1))[:, -1]
    labels = t["actions"][:, f] if "actions" in t else None
    timestep = torch.full((features.shape[0],), settings["decoder_timestep"])
    with torch.inference_mode():
        velocity = model.decoder(t["decoder_input"][:, 0], timestep, features, labels)
    err = (velocity - t["decoder_velocity"][:, 0]).abs().max().item()
    assert err < TOL, f"decoder velocity differs by {err}"


@pytest.mark.parametrize("name", SCD_CASES + FAR_CASES)
def test_generated(name):
    settings, t, model = load_case(name)
    context = model_space_context(settings, t)
    out = generate(model, context, settings["frames_generated"], settings["steps"],
                   guidance=settings["guidance_scale"], conditions=t.get("actions"), noise=t["init_noise"])
    err = (out - t["generated"]).abs().max().item()
    assert err < TOL, f"generated frames differ by {err}"
