"""scd convert: every reference fixture ports (each folder of each kind, tests/reference_fixtures.py), a split baseline keeps its blocks tensor for tensor,
the output loads everywhere, and anything not understood is refused before a folder is written."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import random_model, tiny_config
from hub_server import HubServer
from reference_fixtures import REFERENCE, TOL, check_error, folders
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from scd.checkpoints import load_model, load_model_folder, save_model_folder
from scd.convert import CREATED, DROPPED, MAPPED, CodecSpec, Split, convert, split_layers
from scd.errors import CheckpointError, ConfigError, HubError
from scd.reference import SizeHints, check_far_name
from scd.sampling import generate
from scd_cli.app import app

runner = CliRunner()


def case(name):
    folder = REFERENCE / name
    settings = json.loads((folder / "case.json").read_text()) if (folder / "case.json").exists() else {}
    tensors = load_file(str(folder / "case.safetensors")) if (folder / "case.safetensors").exists() else {}
    return folder, weights_of(folder), settings, tensors


def weights_of(folder):
    """The model's weights (not the DC-AE beside them in fardcaeN/)."""
    return next(p for p in sorted(folder.glob("*.pth")) if p.name != "dcae.pth")


def raw(name):
    return torch.load(weights_of(REFERENCE / name), weights_only=True)


def reproduces(folder, settings, t):
    """Max abs error of the folder's streaming generation against the fixture's `generated`."""
    model = load_model_folder(folder).model
    context = t["context"] if settings.get("latent_space") else t["context"] * 2 - 1
    out = generate(model, context, settings["frames_generated"], settings["steps"],
                   guidance=settings["guidance_scale"], conditions=t.get("actions"), noise=t["init_noise"])
    return (out - t["generated"]).abs().max().item()


def saved(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_split(baseline: dict, scd: dict, k: int, l: int, encoder_norm: str = "identity"):
    """Encoder blocks = the baseline's first K, decoder blocks = its last L, embedders in both,
    head in the decoder; nothing else in the folder but what the reference initialises."""
    blocks = {key for key in baseline if key.startswith("transformer_blocks.")}
    assert len({key.split(".")[1] for key in blocks}) == k + l
    for key in blocks:
        i, rest = int(key.split(".")[1]), key.split(".", 2)[2]
        target = f"encoder.transformer_blocks.{i}.{rest}" if i < k else f"decoder.transformer_blocks.{i - k}.{rest}"
        assert torch.equal(scd[target], baseline[key]), key
    assert not any(f"encoder.transformer_blocks.{k}." in key for key in scd)
    assert not any(f"decoder.transformer_blocks.{l}." in key for key in scd)
    for key in baseline:
        if key.startswith(("x_embedder", "timestep_embedder", "action_embedder", "label_embedder")):
            assert torch.equal(scd[f"encoder.{key}"], baseline[key]) and torch.equal(scd[f"decoder.{key}"], baseline[key])
        if key.startswith(("proj_out", "norm_out")):
            assert torch.equal(scd[f"decoder.{key}"], baseline[key])
    for part in ("weight", "bias"):
        norm = scd[f"encoder.norm_out.linear.{part}"]
        if encoder_norm == "copy":
            assert torch.equal(norm, baseline[f"norm_out.linear.{part}"])
        else:
            assert not norm.any()
    assert "encoder.proj_out.weight" not in scd


# ----------------------------------------------------------------------------- the reference fixtures

@pytest.mark.parametrize("name", folders("far"))
def test_far_fixture_splits_into_scd(name, tmp_path):
    folder, weights, _, t = case(name)
    report = convert(weights, tmp_path / "scd", options=folder / "options.yml")
    baseline = raw(name)
    depth = report.config.layers
    k, l = depth - depth // 3, depth // 3
    assert (report.kind, report.config.arch, report.config.encoder_layers, report.config.decoder_layers) == ("far", "scd", k, l)
    assert_split(baseline, saved(tmp_path / "scd"), k, l)
    assert report.config.encoder_noise == 0.05 and report.config.decoder_combine == "token_concat"
    totals = report.totals()
    assert totals[DROPPED] == (0, 0)
    assert totals[CREATED][0] == 2  # the encoder's norm_out weight and bias
    assert {e.source for e in report.entries if e.action == MAPPED} == set(baseline)
    assert report.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    loaded = load_model_folder(tmp_path / "scd")
    assert loaded.config == report.config
    card = (tmp_path / "scd" / "README.md").read_text()
    assert report.sha256 in card and str(weights) in card and "FAR checkpoint" in card


@pytest.mark.parametrize("name", folders("far"))
def test_far_fixture_resaved_as_baseline_reproduces_the_reference(name, tmp_path):
    folder, weights, settings, t = case(name)
    report = convert(weights, tmp_path / 'base', options=folder / 'options.yml', to='baseline', sizes=SizeHints(latent_size=tuple(t['context'].shape[-2:])))
    assert report.config.arch == "baseline" and report.totals()[CREATED] == (0, 0)
    check_error(name, "converted_generated", reproduces(tmp_path / "base", settings, t))


@pytest.mark.parametrize("name", folders("farlabel"))
def test_far_label_fixture_resaved_as_baseline_reproduces_the_reference(name, tmp_path):
    folder, weights, settings, t = case(name)
    report = convert(weights, tmp_path / "base", options=folder / "options.yml", to="baseline")
    c = load_model_folder(tmp_path / "base").config
    assert report.config.arch == "baseline" and (c.condition, c.num_classes) == ("label", settings["num_classes"])
    b, _, channels, h, w = t["init_noise"].shape
    context = t["context"] if "context" in t else torch.zeros(b, 0, channels, h, w)
    out = generate(load_model_folder(tmp_path / "base").model, context, settings["frames_generated"], settings["steps"],
                   guidance=settings["guidance_scale"], conditions=t["labels"], noise=t["init_noise"])
    check_error(name, "converted_generated", (out - t["generated"]).abs().max().item())


@pytest.mark.parametrize("name", folders("fardcae"))
def test_far_dcae_fixture_converts_with_its_codec_and_reproduces_the_pixels(name, tmp_path):
    """FAR's transformer with its DC-AE attached: pixels in, latents and (unclamped) pixels out."""
    folder, weights, settings, t = case(name)
    convert(weights, tmp_path / "base", options=folder / "options.yml", to="baseline",
            codec=CodecSpec(path=folder / "dcae.pth", config=folder / "dcae_config.json"))
    loaded = load_model_folder(tmp_path / "base")
    c = loaded.config
    assert (c.codec.type, c.codec.scaling_factor, c.codec.downsample) == ("dcae", settings["scaling_factor"], settings["spatial_compression"])
    assert c.frame_size == (settings["resolution"],) * 2
    b, f = t["context"].shape[:2]
    latents = loaded.encode(t["context"].flatten(0, 1) * 2 - 1).unflatten(0, (b, f))
    check_error(name, "converted_context_latents", (latents - t["context_latents"]).abs().max().item())
    out = generate(loaded.model, latents, settings["frames_generated"], settings["steps"],
                   guidance=settings["guidance_scale"], conditions=t.get("actions"), noise=t["init_noise"])
    check_error(name, "converted_generated", (out - t["generated"]).abs().max().item())
    with torch.inference_mode():
        raw = loaded.codec.autoencoder.decode(out.flatten(0, 1) / loaded.codec.scaling_factor).sample
    check_error(name, "converted_generated_pixels_raw", (raw.unflatten(0, (b, -1)) - t["generated_pixels_raw"]).abs().max().item())


@pytest.mark.parametrize("name", folders("far_long"))
def test_far_long_fixture_drops_and_reports_its_long_context_branch(name, tmp_path):
    folder, weights, _, _ = case(name)
    report = convert(weights, tmp_path / "scd", options=folder / "options.yml")
    long_state = raw(name)
    far_keys = set(raw(name.removesuffix("_long")))  # same sizes: FAR's keys are FAR_Long's minus the branch
    dropped = {e.source for e in report.entries if e.action == DROPPED}
    assert dropped == set(long_state) - far_keys and dropped
    assert all(e.target is None for e in report.entries if e.action == DROPPED)
    assert {k.split(".")[0] for k in dropped} == {"context_embedder", "context_proj_out", "transformer_blocks"}
    assert all(".attn.add_" in k or ".attn.to_add_out" in k or ".attn.norm_added_" in k
               for k in dropped if k.startswith("transformer_blocks"))
    assert report.totals()[DROPPED] == (len(dropped), sum(long_state[k].numel() for k in dropped))
    assert report.kind == "far_long"
    c = report.config
    assert_split({k: v for k, v in long_state.items() if k not in dropped}, saved(tmp_path / "scd"),
                 c.encoder_layers, c.decoder_layers)
    card = (tmp_path / "scd" / "README.md").read_text()
    assert "## Dropped" in card and "context_embedder.weight" in card
    load_model_folder(tmp_path / "scd")
    # the same file re-saved as a baseline loads where FAR_Long could not (load_reference refuses it)
    convert(weights, tmp_path / "base", options=folder / "options.yml", to="baseline")
    assert load_model_folder(tmp_path / "base").config.arch == "baseline"


@pytest.mark.parametrize("name", folders("case"))
def test_official_scd_fixture_resaves_and_reproduces_generation(name, tmp_path):
    folder, weights, settings, t = case(name)
    report = convert(weights, tmp_path / 'scd', options=folder / 'options.yml', sizes=SizeHints(latent_size=tuple(t['context'].shape[-2:])))
    assert report.kind == "scd" and report.config.decoder_combine == settings["decoder_input_combine"]
    totals = report.totals()
    assert totals[CREATED] == (0, 0) and totals[DROPPED] == (0, 0)
    state = saved(tmp_path / "scd")
    reference = raw(name)
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    check_error(name, "converted_generated", reproduces(tmp_path / "scd", settings, t))


@pytest.mark.parametrize("name", folders("casecfgdec"))
def test_official_decoder_guidance_fixture_resaves_and_reproduces_generation(name, tmp_path):
    """`cfg_type: decoder` and its noise strength travel into the folder's config."""
    folder, weights, settings, t = case(name)
    convert(weights, tmp_path / "scd", options=folder / "options.yml", sizes=SizeHints(latent_size=tuple(t["context"].shape[-2:])))
    loaded = load_model_folder(tmp_path / "scd")
    c = loaded.config
    assert (c.guidance_mode, c.default_guidance, max(c.encoder_noise, 0.05)) == (
        "decoder", settings["guidance_scale"], settings["uncond_noise_strength"])
    out = generate(loaded.model, t["context"] * 2 - 1, settings["frames_generated"], c.default_steps,
                   guidance=c.default_guidance, conditions=t.get("actions"), noise=t["init_noise"],
                   feature_noise=t["uncond_noise"].transpose(0, 1))
    check_error(name, "converted_generated", (out - t["generated"]).abs().max().item())


def test_official_accelerate_safetensors_with_module_prefix(tmp_path):
    folder, weights, settings, t = case("case1")
    trainer = tmp_path / "checkpoint-1000"
    trainer.mkdir()
    save_file({f"module.{k}": v for k, v in raw("case1").items()}, str(trainer / "model.safetensors"))
    for src in (trainer, trainer / "model.safetensors"):
        out = tmp_path / f"out-{src.name}"
        convert(src, out, options=folder / 'options.yml', sizes=SizeHints(latent_size=tuple(t['context'].shape[-2:])))
        assert reproduces(out, settings, t) < TOL


def test_official_scd_needs_its_options(tmp_path):
    _, weights, _, _ = case("case0")
    with pytest.raises(CheckpointError, match="give its options file"):
        convert(weights, tmp_path / "x")
    with pytest.raises(CheckpointError, match="describes a FAR model"):
        convert(weights, tmp_path / "x", options=REFERENCE / "far0" / "options.yml")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- sizes without an options file

def test_bare_far_file_sizes_read_off_the_tensors(tmp_path):
    folder, weights, _, _ = case("far0")
    with_options = convert(weights, tmp_path / "a", options=folder / "options.yml")
    bare = convert(weights, tmp_path / "b")  # head dim 16: FAR's proportions give (4, 6, 6), as the options say
    assert bare.config == with_options.config
    assert any("RoPE axes (4, 6, 6)" in note for note in bare.notes)
    a, b = saved(tmp_path / "a"), saved(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    flagged = convert(weights, tmp_path / 'c', sizes=SizeHints(num_heads=2, head_dim=16, layers=4, channels=4, patch_size=1, rope_axes=(4, 6, 6), latent_size=(8, 8)))
    assert flagged.config == with_options.config and not any("FAR's defaults" in n for n in flagged.notes)


def test_bare_far_file_refuses_contradicting_sizes(tmp_path):
    _, weights, _, _ = case("far0")
    with pytest.raises(CheckpointError, match="has 2 heads .* but preset B says 12"):
        convert(weights, tmp_path / 'x', sizes=SizeHints(preset='B'))
    with pytest.raises(CheckpointError, match="has 4 layers .* but layers is 12"):
        convert(weights, tmp_path / 'x', sizes=SizeHints(layers=12))
    with pytest.raises(CheckpointError, match="not 3 channels x patch 1"):
        convert(weights, tmp_path / 'x', sizes=SizeHints(channels=3))
    _, far1, _, _ = case("far1")  # head dim 8: no FAR default RoPE split
    with pytest.raises(ConfigError, match="give rope_axes"):
        convert(far1, tmp_path / "x")
    with pytest.raises(ConfigError, match="sizes given .num_heads. are for a checkpoint without an options file"):
        convert(weights, tmp_path / 'x', options=REFERENCE / 'far0' / 'options.yml', sizes=SizeHints(num_heads=2))
    assert not (tmp_path / "x").exists()


def test_unknown_keys_and_inconsistent_shapes_are_refused(tmp_path):
    folder, _, _, _ = case("far0")
    state = raw("far0")
    torch.save({**state, "pos_embed.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="1 unknown: pos_embed.weight"):
        convert(tmp_path / "extra.pth", tmp_path / "x", options=folder / "options.yml")
    bad = dict(state)
    bad["proj_out.weight"] = torch.zeros(5, 32)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"mis-shaped: proj_out.weight \(5, 32\) != \(4, 32\)"):
        convert(tmp_path / "shape.pth", tmp_path / "x", options=folder / "options.yml")
    _, far1, _, _ = case("far1")
    with pytest.raises(CheckpointError, match="does not fit a baseline model"):
        convert(far1, tmp_path / "x", options=folder / "options.yml")  # far1's weights, far0's sizes
    torch.save({"encoder_weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is not a FAR, FAR_Long or SCD checkpoint"):
        convert(tmp_path / "other.pth", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- scd's own baseline folders

@pytest.fixture
def baseline_folder(tmp_path):
    model = random_model(tiny_config(arch="baseline", layers=6), seed=3)
    return save_model_folder(model, tmp_path / "baseline")


@pytest.mark.parametrize("k,l", [(4, 2), (5, 1), (1, 5)])
def test_baseline_folder_split_keeps_blocks_tensor_for_tensor(baseline_folder, tmp_path, k, l):
    out = tmp_path / f"scd-{k}-{l}"
    report = convert(baseline_folder, out, split=Split(encoder_layers=k, decoder_layers=l))
    assert report.kind == "baseline-folder"
    assert_split(saved(baseline_folder), saved(out), k, l)
    loaded = load_model(str(out))  # the resolver every command uses
    assert (loaded.config.arch, loaded.config.encoder_layers, loaded.config.decoder_layers) == ("scd", k, l)
    base = load_model_folder(baseline_folder).config
    assert (loaded.config.frame_size, loaded.config.codec, loaded.config.action_names) == \
        (base.frame_size, base.codec, base.action_names)
    # it runs: two context frames, one generated
    context = torch.randn(1, 2, 3, 4, 4)
    assert generate(loaded.model, context, 1, 2).shape == (1, 1, 3, 4, 4)


def test_blocks_chosen_by_index_may_repeat_or_be_skipped(baseline_folder, tmp_path):
    base = saved(baseline_folder)
    report = convert(baseline_folder, tmp_path / "picked", split=Split(encoder_blocks="0-3", decoder_blocks="0,4"))
    out = saved(tmp_path / "picked")
    assert (report.config.encoder_layers, report.config.decoder_layers) == (4, 2)
    for half, blocks in (("encoder", (0, 1, 2, 3)), ("decoder", (0, 4))):
        for i, b in enumerate(blocks):
            for key in (k for k in base if k.startswith(f"transformer_blocks.{b}.")):
                assert torch.equal(out[f"{half}.transformer_blocks.{i}.{key.split('.', 2)[2]}"], base[key])
    dropped = {e.source.split(".")[1] for e in report.entries if e.action == DROPPED}
    assert dropped == {"5"}  # block 5 went nowhere: reported, not silently lost
    assert any("decoder blocks 0-1 <- baseline blocks 0, 4" in n for n in report.notes)
    assert any(e.note == "decoder block 1 <- block 4" for e in report.entries)
    # give one half, the other is the rest
    rest = convert(baseline_folder, tmp_path / "rest", split=Split(decoder_blocks=[4, 5]))
    assert (rest.config.encoder_layers, rest.config.decoder_layers) == (4, 2)
    for spec, message in (("0-9", "names block 6, but the baseline has blocks 0-5"), ("3-1", "runs backwards"),
                          ("a-b", "takes block indices and ranges")):
        with pytest.raises(ConfigError, match=message):
            convert(baseline_folder, tmp_path / "x", split=Split(encoder_blocks=spec))
    with pytest.raises(ConfigError, match="encoder_layers 3 contradicts encoder_blocks, which select 4"):
        convert(baseline_folder, tmp_path / "x", split=Split(encoder_layers=3, encoder_blocks="0-3"))
    r = runner.invoke(app, ["convert", str(baseline_folder), "--out", str(tmp_path / "cli"), "--encoder-blocks",
                            "0-4", "--decoder-blocks", "0-1,5", "--action-names", "n,s,w,e", "-q"])
    assert r.exit_code == 0, r.output
    config = load_model_folder(tmp_path / "cli").config
    assert (config.encoder_layers, config.decoder_layers, config.action_names) == (5, 3, ("n", "s", "w", "e"))
    with pytest.raises(ConfigError, match="action_names: 3 given for a model of 4"):
        convert(baseline_folder, tmp_path / "x", action_names=("a", "b", "c"))
    assert not (tmp_path / "x").exists()


def test_baseline_split_defaults_and_errors(baseline_folder, tmp_path):
    assert split_layers(12, None, None) == (8, 4)  # the reference's split
    assert split_layers(12, 9, None) == (9, 3) and split_layers(12, None, 2) == (10, 2)
    report = convert(baseline_folder, tmp_path / "default")
    assert (report.config.encoder_layers, report.config.decoder_layers) == (4, 2)
    for k, l in ((4, 3), (6, 0), (0, 6)):
        with pytest.raises(ConfigError, match="must each be at least 1 and add up to the baseline's 6 blocks"):
            convert(baseline_folder, tmp_path / 'x', split=Split(encoder_layers=k, decoder_layers=l))
    with pytest.raises(ConfigError, match="encoder_norm must be identity or copy"):
        convert(baseline_folder, tmp_path / 'x', split=Split(encoder_norm='zeros'))
    with pytest.raises(ConfigError, match="decoder_combine must be one of"):
        convert(baseline_folder, tmp_path / 'x', split=Split(decoder_combine='stack'))
    with pytest.raises(ConfigError, match="own config.json"):
        convert(baseline_folder, tmp_path / "x", options=REFERENCE / "far0" / "options.yml")
    scd = tmp_path / "default"
    with pytest.raises(ConfigError, match="split a baseline into SCD"):
        convert(scd, tmp_path / 'x', split=Split(encoder_layers=3))
    with pytest.raises(ConfigError, match="cannot be turned back into a baseline"):
        convert(scd, tmp_path / "x", to="baseline")
    assert not (tmp_path / "x").exists()


def test_encoder_norm_copy_and_decoder_combines(baseline_folder, tmp_path):
    base = saved(baseline_folder)
    report = convert(baseline_folder, tmp_path / 'copy', split=Split(encoder_norm='copy'))
    assert_split(base, saved(tmp_path / "copy"), 4, 2, encoder_norm="copy")
    assert report.totals()[CREATED] == (0, 0)

    report = convert(baseline_folder, tmp_path / 'concat', split=Split(decoder_combine='concat'))
    state, d = saved(tmp_path / "concat"), 16
    eye = torch.eye(d)
    assert torch.equal(state["decoder.decoder_input_proj.weight"], torch.cat([eye, eye], dim=1))
    assert not state["decoder.decoder_input_proj.bias"].any()
    created = {e.target: e.note for e in report.entries if e.action == CREATED}
    assert created["decoder.decoder_input_proj.weight"].startswith("[I | I]")

    report = convert(baseline_folder, tmp_path / 'proj', split=Split(decoder_combine='token_concat_with_proj'))
    state = saved(tmp_path / "proj")
    assert torch.equal(state["decoder.decoder_alignment.0.weight"], torch.ones(d))
    assert not state["decoder.decoder_alignment.1.weight"].any()
    created = {e.target for e in report.entries if e.action == CREATED}
    assert {k for k in state if "decoder_alignment" in k} <= created
    assert load_model_folder(tmp_path / "proj").config.decoder_combine == "token_concat_with_proj"


def test_conversion_leaves_the_callers_rng_alone(baseline_folder, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    convert(baseline_folder, tmp_path / 'a', split=Split(decoder_combine='concat'))
    assert torch.equal(torch.rand(3), expected)
    convert(baseline_folder, tmp_path / 'b', split=Split(decoder_combine='concat'))
    a, b = saved(tmp_path / "a"), saved(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic


def test_bfloat16_source_stays_bfloat16(tmp_path):
    folder, _, _, _ = case("far0")
    torch.save({k: v.bfloat16() for k, v in raw("far0").items()}, tmp_path / "half.pth")
    convert(tmp_path / "half.pth", tmp_path / "out", options=folder / "options.yml")
    assert {v.dtype for v in saved(tmp_path / "out").values()} == {torch.bfloat16}
    load_model_folder(tmp_path / "out")


def test_output_folder_rules(baseline_folder, tmp_path):
    out = tmp_path / "out"
    convert(baseline_folder, out)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        convert(baseline_folder, out)
    convert(baseline_folder, out, overwrite=True, split=Split(decoder_layers=1))
    assert load_model_folder(out).config.decoder_layers == 1
    with pytest.raises(ConfigError, match="inside the source"):
        convert(baseline_folder, baseline_folder / "sub")


# ----------------------------------------------------------------------------- corrupt and mis-named files

def test_corrupt_files_are_refused(tmp_path):
    data = (REFERENCE / "far0" / "far.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                        dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "empty.pth").write_bytes(b"")
    st = (tmp_path / "model.safetensors")
    save_file(raw("far0"), str(st))
    (tmp_path / "truncated.safetensors").write_bytes(st.read_bytes()[:-100])
    options = REFERENCE / "far0" / "options.yml"
    for name, message in (("truncated.pth", "truncated or corrupt"), ("random.pth", "is not a checkpoint"),
                          ("empty.pth", "is not a checkpoint"), ("truncated.safetensors", "truncated")):
        with pytest.raises(CheckpointError, match=message):
            convert(tmp_path / name, tmp_path / "x", options=options)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "missing.pth", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_far_hashed_names_are_verified(tmp_path):
    weights = REFERENCE / "far0" / "far.pth"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    good = tmp_path / f"FAR_T_Test-{sha[:8]}.pth"
    bad = tmp_path / f"FAR_T_Test-{'0' * 8 if sha[0] != '0' else 'f' * 8}.pth"
    shutil.copy(weights, good)
    shutil.copy(weights, bad)
    options = REFERENCE / "far0" / "options.yml"
    assert convert(good, tmp_path / "ok", options=options).sha256 == sha
    with pytest.raises(CheckpointError, match=f"content hashes to {sha[:8]}"):
        convert(bad, tmp_path / "x", options=options)
    # a corrupt download under its published name is caught by the name before anything reads it
    (tmp_path / f"FAR_T_Cut-{sha[:8]}.pth").write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt, truncated or altered"):
        convert(tmp_path / f"FAR_T_Cut-{sha[:8]}.pth", tmp_path / "x", options=options)
    check_far_name("far.pth", "ab" * 32)  # no hash in the name: nothing to check
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the CLI

def test_cli_end_to_end(tmp_path):
    folder, weights, _, _ = case("far0_long")
    out = tmp_path / "cli"
    r = runner.invoke(app, ["convert", str(weights), "--out", str(out), "--options", str(folder / "options.yml"),
                            "--encoder-layers", "2", "--decoder-layers", "2", "--decoder-combine", "add",
                            "--encoder-norm", "copy", "--fps", "12"])
    assert r.exit_code == 0, r.output
    loaded = load_model_folder(out)
    c = loaded.config
    assert (c.encoder_layers, c.decoder_layers, c.decoder_combine, c.fps) == (2, 2, "add", 12.0)
    assert "transformer_blocks.3.attn.add_q_proj.weight" in r.output  # a dropped tensor's row
    assert "encoder.transformer_blocks.1.attn.to_q.weight" in r.output  # a mapped tensor's row
    assert "42 tensors" in r.output and f"wrote {out}" in r.output.replace("\n", "")

    r = runner.invoke(app, ["convert", str(REFERENCE / "far0" / "far.pth"), "--out", str(tmp_path / "q"), "-q",
                            "--rope-axes", "4,6,6", "--latent-size", "8x8"])
    assert r.exit_code == 0, r.output
    assert "┃" not in r.output and r.output.count("\n") == 1


@pytest.mark.parametrize("args,message", [
    (["convert", "{missing}", "--out", "{out}"], "does not exist"),
    (["convert", "{readme}", "--out", "{out}"], "is not a checkpoint"),
    (["convert", "{far0}", "--out", "{out}", "--latent-size", "8x"], "--latent-size takes"),
    (["convert", "{far0}", "--out", "{out}", "--encoder-layers", "3", "--decoder-layers", "3", "--rope-axes", "4,6,6"],
     "add up to the baseline's 4 blocks"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    paths = {"missing": tmp_path / "nope.pth", "out": tmp_path / "out", "far0": REFERENCE / "far0" / "far.pth",
             "readme": REFERENCE / "README.md"}
    r = runner.invoke(app, [a.format(**paths) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error:")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- Hub sources

@pytest.fixture
def hub(hub_env):
    with HubServer() as server:
        hub_env.setenv("HF_ENDPOINT", server.url)
        yield server, hub_env


def test_hub_source_with_far_hash_name(hub, tmp_path):
    server, env = hub
    data = (REFERENCE / "far0" / "far.pth").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    wrong = "0" * 8 if sha[0] != "0" else "f" * 8
    commit = server.add_repo("guyuchao/FAR_Models", {
        f"short_video_prediction/FAR_T_Test-{sha[:8]}.pth": data,
        f"short_video_prediction/FAR_T_Renamed-{wrong}.pth": data,
        "options/FAR_T.yml": (REFERENCE / "far0" / "options.yml").read_bytes()})

    src = f"guyuchao/FAR_Models:short_video_prediction/FAR_T_Test-{sha[:8]}.pth@{commit}"
    report = convert(src, tmp_path / "scd", options="guyuchao/FAR_Models:options/FAR_T.yml")
    assert (report.revision, report.sha256, report.source) == (commit, sha, src)
    card = (tmp_path / "scd" / "README.md").read_text()
    assert src in card and commit in card and sha in card
    assert_split(raw("far0"), saved(tmp_path / "scd"), 3, 1)

    with pytest.raises(CheckpointError, match=f"named for sha256 {wrong}.*hashes to {sha[:8]}"):
        convert(f"guyuchao/FAR_Models:short_video_prediction/FAR_T_Renamed-{wrong}.pth", tmp_path / "x",
                options=REFERENCE / "far0" / "options.yml")
    with pytest.raises(HubError, match="not found"):
        convert("guyuchao/FAR_Models:short_video_prediction/absent.pth", tmp_path / "x")
    assert not (tmp_path / "x").exists()

    # push the converted folder and load it back by repo id
    env.setenv("HF_TOKEN", server.token)
    report = convert(src, tmp_path / "pushed", options=REFERENCE / "far0" / "options.yml", push_to_hub="me/far-scd")
    repo, pushed = report.pushed.split("@")
    assert repo == "me/far-scd" and pushed == server.head("me/far-scd")
    loaded = load_model(f"me/far-scd@{pushed}")
    assert loaded.config == report.config and loaded.revision == pushed
