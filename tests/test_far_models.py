"""FAR's published files run by name: a repository laid out like `guyuchao/FAR_Models` (tiny random
weights under the real folder and file names, each name carrying its own file's hash) served by
the local Hub server, then read offline from the cache; a local copy in FAR's layout; one-line
errors for what a user can get wrong."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config
from hub_server import HubServer
from typer.testing import CliRunner

from scd.checkpoints import load_model
from scd.convert import convert
from scd.errors import ActionError, CheckpointError, HubError
from scd.mp4 import write_video
from scd.reference import FAR_DCAES, FAR_MODELS, dcae_config, published_stem
from scd.video import read_video
from scd_cli.app import app

import diffusers  # noqa: E402,F401  FAR's models run through a DC-AE: the [test] extra's, never skipped unseen

runner = CliRunner()
REFERENCE = Path(__file__).parent / "fixtures" / "reference"
UCF_COND, UCF_UNCOND = "FAR_L_UCF101_Cond128", "FAR_L_UCF101_Uncond128"
BAIR, UCF_DCAE, BAIR_DCAE = "FAR_B_BAIR_Uncond64", "DCAE_UCF101_Res128", "DCAE_BAIR_Res64"


def tiny_dcae(compression: int, channels: int, seed: int = 0) -> tuple[bytes, dict]:
    """A random DC-AE of FAR's structure (ResBlock stages, then EfficientViT) and `compression`
    pixels per latent, as a FAR-style .pth and its diffusers config."""
    from diffusers import AutoencoderDC

    stages = {4: 3, 8: 4, 16: 5}[compression]
    kinds = (["ResBlock"] * 3 + ["EfficientViTBlock"] * 2)[-stages:] if stages < 4 else \
        ["ResBlock"] * 3 + ["EfficientViTBlock"] * (stages - 3)
    config = {"_class_name": "AutoencoderDC", "attention_head_dim": 8, "in_channels": 3, "latent_channels": channels,
              "scaling_factor": 0.3, "downsample_block_type": "pixel_unshuffle", "upsample_block_type": "pixel_shuffle",
              "encoder_block_out_channels": [8] + [16] * (stages - 1), "decoder_block_out_channels": [8] + [16] * (stages - 1),
              "encoder_block_types": kinds, "decoder_block_types": kinds,
              "encoder_layers_per_block": [0] + [1] * (stages - 1), "decoder_layers_per_block": [0] + [1] * (stages - 1),
              "encoder_qkv_multiscales": [[]] * stages, "decoder_qkv_multiscales": [[]] * stages,
              "decoder_act_fns": ["relu" if k == "ResBlock" else "silu" for k in kinds],
              "decoder_norm_types": ["batch_norm" if k == "ResBlock" else "rms_norm" for k in kinds]}
    torch.manual_seed(seed)
    ae = AutoencoderDC.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in ae.state_dict().items()}, buffer)
    return buffer.getvalue(), config


def tiny_far(condition=None, classes=0, channels=8, seed=0) -> bytes:
    """A random FAR transformer (2 blocks of 2 heads x 16) as FAR's flat .pth."""
    config = tiny_config(arch="baseline", num_heads=2, head_dim=16, rope_axes=(4, 6, 6), channels=channels,
                         patch_size=1, layers=2, condition=condition, num_classes=classes, latent_size=(8, 8),
                         action_names=())
    buffer = io.BytesIO()
    torch.save(random_model(config, seed).state_dict(), buffer)
    return buffer.getvalue()


def hashed_name(folder: str, stem: str, data: bytes, suffix: str = ".pth") -> str:
    return f"{folder}/{stem}-{hashlib.sha256(data).hexdigest()[:8]}{suffix}"


@pytest.fixture(scope="module")
def far_repo():
    return far_files()


def far_files() -> dict[str, bytes]:
    """{path in repo: bytes} laid out like FAR's: two UCF-101 128 px generators, a BAIR predictor,
    their DC-AEs (each with its config beside it: the tiny ones are not FAR's real configs)."""
    files = {}
    ucf_ae, ucf_cfg = tiny_dcae(16, 8)
    bair_ae, bair_cfg = tiny_dcae(8, 8, seed=1)
    for stem, data, cfg in ((UCF_DCAE, ucf_ae, ucf_cfg), (BAIR_DCAE, bair_ae, bair_cfg)):
        name = hashed_name("dcae", stem, data)
        files[name], files[name[:-4] + ".json"] = data, json.dumps(cfg).encode()
    for folder, stem, data in (("video_generation", UCF_COND, tiny_far("label", 101)),
                               ("video_generation", UCF_UNCOND, tiny_far(seed=2)),
                               ("short_video_prediction", BAIR, tiny_far(seed=3))):
        files[hashed_name(folder, stem, data)] = data
    return files


def path_of(files: dict, stem: str) -> str:
    return next(n for n in files if published_stem(n) == stem and n.endswith(".pth"))


@pytest.fixture
def hub(hub_env, far_repo):
    with HubServer() as server:
        hub_env.setenv("HF_ENDPOINT", server.url)
        commit = server.add_repo("guyuchao/FAR_Models", far_repo)
        yield server, hub_env, commit


def test_the_table_knows_fars_sixteen_files():
    assert len(FAR_MODELS) == 10 and len(FAR_DCAES) == 6
    assert FAR_DCAES["DCAE_UCF101_Res64"].path == "dcae/DCAE_UCF101_Res64-9da18dcf.pth"
    for entry in FAR_MODELS.values():  # every transformer's DC-AE is published, at its resolution
        assert FAR_DCAES[entry.dcae].resolution == entry.resolution and entry.latent_size == 8
    assert [len(dcae_config(c)["encoder_block_out_channels"]) for c in (8, 16, 32)] == [4, 5, 6]


def test_generate_runs_a_far_file_from_the_hub_then_offline(hub, far_repo, tmp_path):
    server, env, commit = hub
    ref = f"guyuchao/FAR_Models:{path_of(far_repo, UCF_COND)}"
    out = tmp_path / "ucf.mp4"
    r = runner.invoke(app, ["generate", "--model", ref, "--label", "3", "--frames", "2", "--steps", "2",
                            "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    clip = read_video(out)
    assert clip.frames.shape == (2, 128, 128, 3)  # pixels, through the DC-AE fetched from the same repo
    assert any(p.startswith("dcae/DCAE_UCF101_Res128") for p in server.downloaded())

    env.setenv("HF_HUB_OFFLINE", "1")  # the cache alone
    again = tmp_path / "offline.mp4"
    r = runner.invoke(app, ["generate", "--model", ref, "--label", "3", "--frames", "2", "--steps", "2",
                            "--out", str(again), "-q"])
    assert r.exit_code == 0, r.output
    assert np.array_equal(read_video(again).frames, clip.frames)

    report = convert(ref, tmp_path / "converted")  # scd convert: the same file, its DC-AE from the same repo
    assert report.revision == commit and (tmp_path / "converted" / "codec").is_dir()
    assert report.config.codec.downsample == 16 and report.config.condition == "label"


def test_far_file_settings_come_from_the_table(hub, far_repo):
    server, env, commit = hub
    with pytest.raises(HubError, match="a checkpoint file in it is written guyuchao/FAR_Models:path/to/file.pth"):
        load_model("guyuchao/FAR_Models")
    loaded = load_model(f"guyuchao/FAR_Models:{path_of(far_repo, UCF_COND)}")
    c = loaded.config
    assert (c.arch, c.condition, c.num_classes, c.context_frames, c.default_guidance) == ("baseline", "label", 101, 0, 2.0)
    assert (c.frame_size, c.latent_size, c.codec.downsample) == ((128, 128), (8, 8), 16)
    assert loaded.revision == commit and loaded.codec.scale == 16
    bair = load_model(f"guyuchao/FAR_Models:{path_of(far_repo, BAIR)}").config
    assert (bair.context_frames, bair.frame_size, bair.condition) == (2, (64, 64), None)


def test_a_local_copy_in_fars_layout_runs_with_a_prompt(far_repo, tmp_path):
    for name, data in far_repo.items():
        (tmp_path / "FAR_Models" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "FAR_Models" / name).write_bytes(data)
    prompt = tmp_path / "prompt.mp4"
    write_video(prompt, np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8), fps=8)
    out = tmp_path / "bair.mp4"
    weights = tmp_path / "FAR_Models" / path_of(far_repo, BAIR)
    r = runner.invoke(app, ["generate", "--model", str(weights), "--prompt-frames", str(prompt), "--frames", "2",
                            "--steps", "2", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert read_video(out).frames.shape == (2, 64, 64, 3)

    report = convert(weights, tmp_path / "converted")  # convert knows the file too: sizes, settings, its DC-AE
    assert (report.config.frame_size, report.config.codec.downsample, report.config.context_frames) == ((64, 64), 8, 2)
    assert report.codec.endswith(path_of(far_repo, BAIR_DCAE)) and (tmp_path / "converted" / "codec").is_dir()
    out = tmp_path / "converted.mp4"
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "converted"), "--prompt-frames", str(prompt),
                            "--frames", "2", "--steps", "2", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert read_video(out).frames.shape == (2, 64, 64, 3)

    generator = tmp_path / "FAR_Models" / path_of(far_repo, UCF_COND)  # context 0: benched at the default context
    r = runner.invoke(app, ["bench", "--model", str(generator), "--frames", "2", "--reps", "1", "--warmup", "0",
                            "--steps", "1", "--matmul-size", "128", "--quiet", "--json", str(tmp_path / "bench.json")])
    assert r.exit_code == 0, r.output
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["settings"]["contexts"][0] > 0
    r = runner.invoke(app, ["info", str(generator)])
    assert r.exit_code == 0, r.output
    assert "label (101 + null)" in r.output and "128 x 128" in r.output


@pytest.mark.parametrize("case,message", [
    ("renamed", "is named for sha256 00000000... but its content hashes to"),
    ("label out of range", "--label 101 is out of range: this model has classes 0..100"),
    ("label to unconditional", "--label is for class-conditioned models and this one has no classes: drop it"),
    ("prompt to zero context", "this model generates from pure noise (it was trained with 0 context frames): drop --prompt-frames"),
    ("dcae resolution", "compresses 8x but"),
    ("dcae channels", "makes 4-channel latents but"),
])
def test_clear_errors(far_repo, tmp_path, case, message):
    root = tmp_path / "FAR_Models"
    for name, data in far_repo.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    cond, uncond = root / path_of(far_repo, UCF_COND), root / path_of(far_repo, UCF_UNCOND)
    args = ["--frames", "1", "--steps", "1", "--out", str(tmp_path / "x.mp4")]
    if case == "renamed":
        wrong = cond.with_name(f"{UCF_COND}-00000000.pth")
        cond.rename(wrong)
        args += ["--model", str(wrong), "--label", "1"]
    elif case == "label out of range":
        args += ["--model", str(cond), "--label", "101"]
    elif case == "label to unconditional":
        args += ["--model", str(uncond), "--label", "1"]
    elif case == "prompt to zero context":
        prompt = tmp_path / "p.mp4"
        write_video(prompt, np.zeros((2, 32, 32, 3), np.uint8), fps=8)
        args += ["--model", str(cond), "--label", "1", "--prompt-frames", str(prompt)]
    else:  # replace the UCF-101 DC-AE by one of another compression or other latent channels
        for old in root.glob(f"dcae/{UCF_DCAE}-*"):
            old.unlink()
        data, cfg = tiny_dcae(8, 8) if case == "dcae resolution" else tiny_dcae(16, 4)
        name = root / hashed_name("dcae", UCF_DCAE, data)
        name.write_bytes(data)
        name.with_suffix(".json").write_text(json.dumps(cfg))
        args += ["--model", str(cond), "--label", "1"]
    r = runner.invoke(app, ["generate", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output, r.output
    assert r.output.strip().count("\n") == 0
    assert not (tmp_path / "x.mp4").exists()


def test_no_label_means_unconditional_with_a_warning(far_repo, tmp_path):
    root = tmp_path / "FAR_Models"
    for name, data in far_repo.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    r = runner.invoke(app, ["generate", "--model", str(root / path_of(far_repo, UCF_COND)), "--frames", "1",
                            "--steps", "1", "--out", str(tmp_path / "u.mp4")])
    assert r.exit_code == 0, r.output
    assert "no label given: generating unconditionally (guidance -1 instead of 2)" in r.output
    with pytest.raises(CheckpointError, match="not one of FAR's 10 published files"):
        load_model(str(REFERENCE / "far0" / "far.pth"))
    with pytest.raises(ActionError, match=r"unknown label 'dog': give an index \(0\.\.100\)"):
        from scd.actions import parse_label
        parse_label("dog", (), 101, "label")


def test_an_options_file_with_a_vae_runs_in_pixels(tmp_path):
    """FAR's options with a vae section: prompt pixels go through the DC-AE and out again; the
    options' context length and guidance are the defaults."""
    folder = REFERENCE / "fardcae1"
    prompt = tmp_path / "prompt.mp4"
    write_video(prompt, np.random.default_rng(1).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8), fps=8)
    out = tmp_path / "out.mp4"
    r = runner.invoke(app, ["generate", "--model", str(folder / "far.pth"), "--options", str(folder / "options.yml"),
                            "--prompt-frames", str(prompt), "--frames", "2", "--out", str(out), "--include-prompt",
                            "-q"])
    assert r.exit_code == 0, r.output
    assert read_video(out).frames.shape == (2 + 2, 64, 64, 3)  # the options' context: the last 2 prompt frames


def test_an_options_file_without_a_vae_says_what_to_add(tmp_path):
    folder = REFERENCE / "far0"  # 4-channel latents, no vae section
    prompt = tmp_path / "prompt.mp4"
    write_video(prompt, np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    r = runner.invoke(app, ["generate", "--model", str(folder / "far.pth"), "--options", str(folder / "options.yml"),
                            "--frames", "1", "--out", str(tmp_path / "x.mp4"), "--prompt-frames", str(prompt)])
    assert r.exit_code == 2 and "has no vae section and the model works on 4-channel latents" in r.output, r.output
    assert r.output.strip().count("\n") == 0


def test_labels_by_index_or_name_and_guidance_minus_one_is_unconditional():
    from scd.actions import parse_label
    from scd.reference import load_reference
    from scd.sampling import generate

    names = ("ApplyEyeMakeup", "Archery", "Basketball")
    assert parse_label("archery", names, 3, "label") == 1 and parse_label(2, names, 3, "label") == 2
    with pytest.raises(ActionError, match="unknown label 'dog': give one of ApplyEyeMakeup, Archery"):
        parse_label("dog", names, 3, "label")
    # guidance -1 (the references' unconditional): the null label everywhere, one pass
    folder = REFERENCE / "farlabel1"
    model = load_reference(folder / "far.pth", folder / "options.yml").model
    context, noise = torch.randn(2, 2, 8, 4, 4), torch.randn(2, 2, 8, 4, 4)
    labels = torch.tensor([1, 3])
    uncond = generate(model, context, 2, 2, guidance=-1.0, conditions=labels, noise=noise)
    null = generate(model, context, 2, 2, guidance=1.0, conditions=torch.full((2,), 5), noise=noise)
    cond = generate(model, context, 2, 2, guidance=1.0, conditions=labels, noise=noise)
    assert torch.equal(uncond, null) and not torch.allclose(uncond, cond)


def test_official_options_run_decoder_guidance_from_the_cli(tmp_path):
    """An official SCD checkpoint whose options evaluate with `cfg_type: decoder` (pixel space, 8 px):
    scd generate uses that mode and guidance by default, with no actions needed, and the frames
    depend on the seed's feature noise."""
    folder = REFERENCE / "casecfgdec1"
    prompt = tmp_path / "prompt.mp4"
    write_video(prompt, np.random.default_rng(2).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8), fps=8)
    outs = []
    for guidance in ("1.5", "1"):
        out = tmp_path / f"g{guidance}.mp4"
        r = runner.invoke(app, ["generate", "--model", str(folder / "ema.pth"), "--options", str(folder / "options.yml"),
                                "--prompt-frames", str(prompt), "--frames", "2", "--out", str(out), "--guidance", guidance])
        assert r.exit_code == 0, r.output
        assert "generating unconditionally" not in r.output
        outs.append(read_video(out).frames)
    assert outs[0].shape == (2, 8, 8, 3) and not np.array_equal(outs[0], outs[1])
