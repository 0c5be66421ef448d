"""Parity with the reference implementations: their weights reproduce their fixtures to float32 rounding.

Every folder under tests/fixtures/reference is of a kind (tests/reference_fixtures.py: case, far,
fardcae, farlabel, casecfgdec here; far_long and sfwan elsewhere) and becomes a test of its kind;
drop in another folder of a kind and it is tested with no code change, drop in a folder of no
kind, or one without its kind's files, and `test_every_fixture_folder_is_claimed_and_complete`
fails. Each error is also held to 10x the one recorded in tests/fixtures/reference_errors.json.
"""

import json
from pathlib import Path

import pytest
import torch
from reference_fixtures import EXEMPT, FILES, KINDS, REFERENCE, check_error, folders, kind_of
from safetensors.torch import load_file

from scd.reference import load_reference
from scd.sampling import generate

SCD_CASES, FAR_CASES = folders("case"), folders("far")
DCAE_CASES, LABEL_CASES, DECODER_CFG_CASES = folders("fardcae"), folders("farlabel"), folders("casecfgdec")


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
    assert len(SCD_CASES) >= 4 and len(FAR_CASES) >= 2 and len(folders("far_long")) >= 2
    assert len(DCAE_CASES) >= 2 and len(LABEL_CASES) >= 2 and len(DECODER_CFG_CASES) >= 2


def test_every_fixture_folder_is_claimed_and_complete():
    """No folder is silently ignored: each is of exactly one kind (or exempt, with the reason), holds
    its kind's files, and its kind's test files exist."""
    problems = []
    for path in sorted(REFERENCE.iterdir()):
        if not path.is_dir():
            if path.name not in FILES:
                problems.append(f"{path.name}: a file no test reads")
            continue
        kinds = kind_of(path.name)
        if path.name in EXEMPT:
            if kinds:
                problems.append(f"{path.name}: exempt ({EXEMPT[path.name]}) but also of kind {kinds}")
            continue
        if len(kinds) != 1:
            problems.append(f"{path.name}: of {'no kind' if not kinds else f'kinds {kinds}'} (tests/reference_fixtures.py KINDS)")
            continue
        _, files, tested_in = KINDS[kinds[0]]
        problems += [f"{path.name}: no {name}" for name in files if not (path / name).is_file()]
        problems += [f"{path.name}: its tests {name} do not exist" for name in tested_in
                     if not (Path(__file__).parent / name).is_file()]
    assert not problems, "reference fixtures nobody tests:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", SCD_CASES)
def test_encoder_features(name):
    settings, t, loaded = load_case(name)
    context = model_space_context(settings, t)
    f = context.shape[1]
    actions = t["actions"][:, 1:f + 1] if "actions" in t else None
    with torch.inference_mode():
        features = loaded.model.encoder(context, actions)  # (B, F, T, D), no cache
    check_error(name, "encoder_features", (features.flatten(1, 2) - t["encoder_features"]).abs().max().item())


@pytest.mark.parametrize("name", SCD_CASES)
def test_decoder_velocity(name):
    settings, t, loaded = load_case(name)
    f = t["context"].shape[1]
    features = t["encoder_features"].unflatten(1, (f, -1))[:, -1]
    labels = t["actions"][:, f] if "actions" in t else None
    timestep = torch.full((features.shape[0],), settings["decoder_timestep"])
    with torch.inference_mode():
        velocity = loaded.model.decoder(t["decoder_input"][:, 0], timestep, features, labels)
    check_error(name, "decoder_velocity", (velocity - t["decoder_velocity"][:, 0]).abs().max().item())


@pytest.mark.parametrize("name", SCD_CASES + FAR_CASES)
def test_generated(name):
    settings, t, loaded = load_case(name)
    context = model_space_context(settings, t)
    out = generate(loaded.model, context, settings["frames_generated"], settings["steps"],
                   guidance=settings["guidance_scale"], conditions=t.get("actions"), noise=t["init_noise"])
    check_error(name, "generated", (out - t["generated"]).abs().max().item())


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
    check_error(name, "context_latents", (latents - t["context_latents"]).abs().max().item())
    out = generate(loaded.model, latents, settings["frames_generated"], c.default_steps,
                   guidance=c.default_guidance, conditions=t.get("actions"), noise=t["init_noise"])
    check_error(name, "generated", (out - t["generated"]).abs().max().item())
    pixels = loaded.decode(torch.cat([latents, out], 1).flatten(0, 1)).unflatten(0, (b, -1))
    check_error(name, "decoded", ((pixels / 2 + 0.5).clamp(0, 1) - t["decoded"]).abs().max().item())
    # the clamp hides a tenth of the generated pixels: the codec's decode before it, against FAR's
    codec = loaded.codec
    assert codec.scaling_factor == settings["scaling_factor"]
    with torch.inference_mode():
        raw = codec.autoencoder.decode(out.flatten(0, 1) / codec.scaling_factor).sample.unflatten(0, (b, -1))
    assert ((t["generated_pixels_raw"] < -1) | (t["generated_pixels_raw"] > 1)).float().mean() > 0.05  # clamped in `decoded`
    check_error(name, "generated_pixels_raw", (raw - t["generated_pixels_raw"]).abs().max().item())
    assert (pixels[:, f:] - raw.clamp(-1, 1)).abs().max() < 1e-5  # and decode is that, clamped


@pytest.mark.parametrize("name", LABEL_CASES)
def test_far_class_labels_with_and_without_context(name):
    settings, t, loaded = load_case(name, latent_size=False)
    assert (loaded.config.condition, loaded.config.num_classes) == ("label", settings["num_classes"])
    assert loaded.config.context_frames == settings["frames_context"]
    b, _, c, h, w = t["init_noise"].shape
    context = t["context"] if "context" in t else torch.zeros(b, 0, c, h, w)  # 0 frames: from pure noise
    out = generate(loaded.model, context, settings["frames_generated"], settings["steps"],
                   guidance=settings["guidance_scale"], conditions=t["labels"], noise=t["init_noise"])
    check_error(name, "generated", (out - t["generated"]).abs().max().item())


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
    check_error(name, "generated", (out - t["generated"]).abs().max().item())
    # the noise matters: other draws give other frames
    other = generate(loaded.model, t["context"] * 2 - 1, settings["frames_generated"], c.default_steps, **kwargs)
    assert (other - t["generated"]).abs().max().item() > 1e-3
