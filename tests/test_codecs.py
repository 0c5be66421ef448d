"""Codecs: the pixel identity, and DC-AE through diffusers' AutoencoderDC on a tiny random configuration
shaped like FAR's (a first stage with no blocks, batch-norm decoder stages, ReLU/SiLU)."""

import hashlib
import json
import sys

import diffusers  # the [test] extra's: a missing one fails here rather than skipping the module unseen
import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from scd.checkpoints import load_model_folder, save_model_folder
from scd.codecs import CodecConfig, DCAECodec, PixelCodec, load_codec
from scd.convert import CodecSpec, convert
from scd.errors import CheckpointError, ConfigError
from scd.mp4 import write_video
from scd.sampling import generate
from scd.video import read_video
from scd_cli.app import app

FACTOR = 0.2889
# three stages, the first without blocks: 4x downsampling, 8 latent channels
TINY_DCAE = {
    "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 8, "attention_head_dim": 4,
    "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [8, 16, 16], "decoder_block_out_channels": [8, 16, 16],
    "encoder_layers_per_block": [0, 1, 1], "decoder_layers_per_block": [0, 1, 1],
    "encoder_qkv_multiscales": [[], [], []], "decoder_qkv_multiscales": [[], [], []],
    "decoder_norm_types": ["batch_norm", "batch_norm", "rms_norm"], "decoder_act_fns": ["relu", "relu", "silu"],
    "upsample_block_type": "pixel_shuffle", "downsample_block_type": "pixel_unshuffle", "scaling_factor": FACTOR,
}


def tiny_autoencoder(seed=0):
    """Every parameter and batch-norm statistic random, so a dropped or misplaced tensor shows."""
    torch.manual_seed(seed)
    ae = diffusers.AutoencoderDC.from_config({k: v for k, v in TINY_DCAE.items() if not k.startswith("_")})
    with torch.no_grad():
        for name, t in ae.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.normal_(0, 0.2)
    return ae.eval()


def pixels(n=3, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def far_style_pth(ae, folder, name="DCAE_Tiny_Res16"):
    """The autoencoder as FAR publishes it: a flat state dict named NAME-<sha256[:8]>.pth, and its config json."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(ae.state_dict(), tmp)
    path = folder / f"{name}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    (folder / "model_4x_c8_config.json").write_text(json.dumps(TINY_DCAE))
    return path, folder / "model_4x_c8_config.json"


def test_pixel_codec_is_the_identity():
    x = pixels()
    codec = PixelCodec().to("cpu", torch.float32)
    assert torch.equal(codec.encode(x), x)
    assert torch.equal(codec.decode(x * 3), (x * 3).clamp(-1, 1))


def test_dcae_codec_scales_latents_and_shapes():
    ae = tiny_autoencoder()
    codec = DCAECodec(ae, FACTOR)
    x = pixels(n=5)
    z = codec.encode(x)
    assert codec.scale == 4 and z.shape == (5, 8, 4, 4)
    with torch.no_grad():
        raw = ae.encode(x).latent
        decoded = ae.decode(raw).sample
    assert torch.allclose(z, raw * FACTOR, atol=1e-6)
    y = codec.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.abs().max() <= 1
    assert torch.allclose(y, decoded.clamp(-1, 1), atol=1e-5)
    # chunked calls give what one call gives
    assert torch.allclose(DCAECodec(ae, FACTOR, chunk=2).encode(x), z, atol=1e-6)
    half = DCAECodec(tiny_autoencoder(), FACTOR).to("cpu", torch.bfloat16)
    assert half.encode(x).dtype == torch.bfloat16 and half.decode(z).dtype == torch.float32


def write_codec_folder(ae, folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY_DCAE))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))


def test_dcae_round_trip_through_a_model_folder(tmp_path):
    ae = tiny_autoencoder()
    config = tiny_config(channels=8, patch_size=1, latent_size=(4, 4), frame_size=(16, 16),
                         codec={"type": "dcae", "scaling_factor": FACTOR, "downsample": 4})
    folder = save_model_folder(random_model(config), tmp_path / "model")
    write_codec_folder(ae, folder / "codec")
    loaded = load_model_folder(folder)
    codec = load_codec(loaded.config.codec, loaded.folder)
    x = pixels()
    expected = DCAECodec(ae, FACTOR).encode(x)
    assert torch.equal(codec.encode(x), expected)
    assert torch.equal(codec.decode(expected), DCAECodec(ae, FACTOR).decode(expected))

    with pytest.raises(CheckpointError, match="downsamples 8x but .* is a 4x DC-AE"):
        load_codec(CodecConfig("dcae", FACTOR, 8), folder)
    with pytest.raises(CheckpointError, match="has no codec/ folder"):
        load_codec(CodecConfig("dcae"), tmp_path)
    with pytest.raises(ConfigError, match="unknown codec type 'vqgan'"):
        CodecConfig.from_dict({"type": "vqgan"})
    with pytest.raises(ConfigError, match="unknown codec fields"):
        CodecConfig.from_dict({"type": "dcae", "scale": 2})
    (folder / "codec" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no diffusion_pytorch_model.safetensors"):
        load_codec(loaded.config.codec, folder)


def test_missing_diffusers_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "codec"
    write_codec_folder(tiny_autoencoder(), folder)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(CheckpointError, match=r"pip install 'scd\[dcae\]'"):
        DCAECodec.from_folder(folder)


# ----------------------------------------------------------------------------- attaching a codec with scd convert

@pytest.fixture
def far_like(tmp_path):
    """A FAR checkpoint on 8-channel latents (FAR's fixture far1 has 8 channels) saved as a baseline folder."""
    config = tiny_config(arch="baseline", channels=8, patch_size=1, latent_size=(4, 4), frame_size=(4, 4), layers=3)
    return save_model_folder(random_model(config), tmp_path / "baseline")


def test_convert_attaches_a_far_dcae_pth(far_like, tmp_path):
    ae = tiny_autoencoder(seed=5)
    pth, config_json = far_style_pth(ae, tmp_path / "dcae")
    report = convert(far_like, tmp_path / 'scd', codec=CodecSpec(path=pth, config=config_json))
    assert report.codec == str(pth) and report.codec_sha256 == hashlib.sha256(pth.read_bytes()).hexdigest()
    loaded = load_model_folder(tmp_path / "scd")
    c = loaded.config
    assert c.codec == CodecConfig("dcae", FACTOR, 4) and c.frame_size == (16, 16)
    assert sorted(p.name for p in (tmp_path / "scd" / "codec").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    codec = load_codec(c.codec, loaded.folder)
    x = pixels()
    assert torch.equal(codec.encode(x), DCAECodec(ae, FACTOR).encode(x))
    assert report.codec_sha256 in (tmp_path / "scd" / "README.md").read_text()

    # a folder with a codec converts again with its codec carried along
    convert(tmp_path / "scd", tmp_path / "again")
    again = load_codec(load_model_folder(tmp_path / "again").config.codec, tmp_path / "again")
    assert torch.equal(again.encode(x), codec.encode(x))


def test_convert_attaches_a_diffusers_folder_and_checks_it(far_like, tmp_path):
    ae = tiny_autoencoder(seed=6)
    ae.save_pretrained(tmp_path / "dcae-diffusers")
    report = convert(far_like, tmp_path / 'scd', codec=CodecSpec(path=tmp_path / 'dcae-diffusers', scaling_factor=0.5))
    loaded = load_model_folder(tmp_path / "scd")
    assert loaded.config.codec.scaling_factor == 0.5 and report.totals()["created"][0] == 2
    x = pixels()
    assert torch.equal(load_codec(loaded.config.codec, loaded.folder).encode(x), DCAECodec(ae, 0.5).encode(x))

    pth, config_json = far_style_pth(ae, tmp_path / "dcae")
    with pytest.raises(ConfigError, match="not one of FAR.s DC-AEs: give its diffusers config"):
        convert(far_like, tmp_path / 'x', codec=CodecSpec(path=pth))
    renamed = pth.with_name("DCAE_Tiny_Res16-00000000.pth")
    pth.rename(renamed)
    with pytest.raises(CheckpointError, match="content hashes to"):
        convert(far_like, tmp_path / 'x', codec=CodecSpec(path=renamed, config=config_json))
    state = ae.state_dict()
    state.pop("encoder.conv_out.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="1 missing: encoder.conv_out.weight"):
        convert(far_like, tmp_path / 'x', codec=CodecSpec(path=tmp_path / 'partial.pth', config=config_json))
    (tmp_path / "c4.json").write_text(json.dumps({**TINY_DCAE, "latent_channels": 4}))
    torch.save(diffusers.AutoencoderDC.from_config({k: v for k, v in TINY_DCAE.items() if k[0] != "_"} | {"latent_channels": 4}).state_dict(),
               tmp_path / "c4.pth")
    with pytest.raises(CheckpointError, match="makes 4-channel latents but the model works on 8"):
        convert(far_like, tmp_path / 'x', codec=CodecSpec(path=tmp_path / 'c4.pth', config=tmp_path / 'c4.json'))
    assert not (tmp_path / "x").exists()


def test_generate_runs_through_the_dcae_of_a_converted_model(far_like, tmp_path):
    """A converted model with its DC-AE turns a pixel prompt into latents and its frames back into
    pixels: the frames written are the autoencoder's decode (diffusers' own, not scd's codec) of
    the latents the model streams from the autoencoder's encoding of the prompt."""
    ae = tiny_autoencoder(seed=7)
    pth, config_json = far_style_pth(ae, tmp_path / "dcae")
    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(far_like), "--out", str(tmp_path / "scd"), "--codec", str(pth),
                            "--codec-config", str(config_json), "-q"])
    assert r.exit_code == 0, r.output
    frames = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    for i in range(4):
        frames[i, 4:10, 2 * i:2 * i + 6] = (220, 180, 40)
    write_video(tmp_path / "prompt.mp4", frames, fps=4)
    out = tmp_path / "out.mp4"
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "scd"), "--prompt-frames", str(tmp_path / "prompt.mp4"),
                            "--frames", "2", "--steps", "2", "--out", str(out), "--seed", "4", "--actions", "up,left",
                            "--guidance", "1", "--frames-dir", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    clip = read_video(out)
    assert clip.frames.shape == (2, 16, 16, 3)
    written = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "png").glob("*.png"))])
    prompt = torch.from_numpy(read_video(tmp_path / "prompt.mp4").frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    model = load_model_folder(tmp_path / "scd")
    with torch.no_grad():
        context = ae.encode(prompt).latent * FACTOR
        null = model.config.null_class
        latents = generate(model.model, context[None], 2, 2, guidance=1.0, seed=4, window=model.config.window,
                           conditions=torch.tensor([[null] * len(prompt) + [0, 2]]))[0]
        expected = ((ae.decode(latents / FACTOR).sample.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert written.shape == (2, 16, 16, 3) and np.abs(written - expected.numpy()).max() <= 1
    assert np.abs(clip.frames.astype(int).mean((1, 2)) - written.mean((1, 2))).max() < 8  # the video too (H.264: on average)
