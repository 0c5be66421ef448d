"""The Wan VAE codec on a tiny random AutoencoderKLWan: streamed decoding equals whole decoding,
the latent normalisation, the 1 + 4k frame rule of encoding, and the errors of a bad vae/ folder."""

import json
import shutil

import pytest
import torch
from wan_base import Z_DIM, make_wan_base

from scd.errors import CheckpointError, VideoError
from scd.wan_vae import WanVAE, latent_frames, video_frames

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_wan_base(tmp_path_factory.mktemp("wan") / "base", seed=3)


@pytest.fixture(scope="module")
def vae(base):
    return WanVAE.from_base(base)


def random_latents(batch, frames, size=4, seed=0):
    return torch.randn(batch, frames, Z_DIM, size, size, generator=torch.Generator().manual_seed(seed))


def test_frame_counts():
    assert [latent_frames(f) for f in (1, 2, 4, 5, 8, 9, 81)] == [1, 1, 1, 2, 2, 3, 21]
    assert [video_frames(n) for n in (1, 2, 3, 21)] == [1, 5, 9, 81]


def test_whole_decode_is_diffusers_decode_of_denormalised_latents(vae):
    latents = random_latents(1, 3)
    mean = torch.tensor(vae.autoencoder.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.autoencoder.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():  # diffusers' WanPipeline: latents / (1 / std) + mean, then decode
        expected = vae.autoencoder.decode(latents.permute(0, 2, 1, 3, 4) * std + mean).sample.permute(0, 2, 1, 3, 4)
    pixels = vae.decode(latents)
    assert pixels.shape == (1, 9, 3, 32, 32) and pixels.dtype == torch.float32
    assert torch.equal(pixels, expected.clamp(-1, 1))
    assert pixels.std() > 0.05 and pixels.min() >= -1 and pixels.max() <= 1  # the random VAE draws something


@pytest.mark.parametrize("chunk", [3, 1, 2])
def test_chunked_decoding_equals_whole(vae, chunk):
    latents = random_latents(2, 7, seed=chunk)
    whole = vae.decode(latents)  # (2, 25, 3, 32, 32)
    decoder = vae.stream_decoder()
    parts = [decoder.decode(latents[:, i:i + chunk]) for i in range(0, 7, chunk)]
    sizes = [min(chunk, 7 - i) for i in range(0, 7, chunk)]
    assert [p.shape[1] for p in parts] == [4 * sizes[0] - 3] + [4 * n for n in sizes[1:]]
    streamed = torch.cat(parts, dim=1)
    assert streamed.shape == whole.shape == (2, 25, 3, 32, 32)
    assert (streamed - whole).abs().max().item() < 1e-5
    assert (decoder.latent_frames, decoder.video_frames) == (7, 25)


def test_stream_carries_the_cache_and_reset_forgets_it(vae):
    latents = random_latents(1, 6, seed=5)
    decoder = vae.stream_decoder()
    first = decoder.decode(latents[:, :3])
    second = decoder.decode(latents[:, 3:])
    alone = vae.stream_decoder().decode(latents[:, 3:])  # the same chunk as a video's start: no history
    assert alone.shape[1] == 9 and second.shape[1] == 12
    assert (alone - second[:, 3:]).abs().max() > 1e-3
    decoder.reset()
    assert decoder.latent_frames == 0 and torch.equal(decoder.decode(latents[:, :3]), first)


def test_stream_memory_stays_flat(vae):
    decoder = vae.stream_decoder()

    def cached_numbers():
        return sum(t.numel() for t in decoder._cache if isinstance(t, torch.Tensor))

    latents = random_latents(1, 12, seed=6)
    sizes = []
    for i in range(0, 12, 3):
        decoder.decode(latents[:, i:i + 3])
        sizes.append(cached_numbers())
    assert sizes[1] == sizes[2] == sizes[3] > 0


def test_stream_refuses_another_batch_and_bad_latents(vae):
    decoder = vae.stream_decoder()
    decoder.decode(random_latents(2, 1))
    with pytest.raises(ValueError, match="batch of 2"):
        decoder.decode(random_latents(1, 1))
    with pytest.raises(ValueError, match=r"\(B, n, 4, h, w\)"):
        vae.stream_decoder().decode(torch.zeros(1, 1, Z_DIM + 1, 4, 4))


def test_normalisation_round_trips(vae):
    mu = random_latents(1, 2)
    assert torch.allclose(vae.denormalize(vae.normalize(mu)), mu, atol=1e-6)
    mean = torch.tensor(vae.autoencoder.config.latents_mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(vae.autoencoder.config.latents_std).view(1, 1, -1, 1, 1)
    assert torch.allclose(vae.normalize(mu), (mu - mean) / std)


def clip(frames, size=32, seed=0):
    return torch.rand(1, frames, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_is_the_normalised_encoder_mean(vae):
    pixels = clip(5)
    latents = vae.encode(pixels)
    assert latents.shape == (1, 2, Z_DIM, 4, 4) and latents.dtype == torch.float32
    with torch.no_grad():
        mu = vae.autoencoder.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist.mean.permute(0, 2, 1, 3, 4)
    assert torch.allclose(latents, vae.normalize(mu), atol=1e-6)


@pytest.mark.parametrize("frames, expected", [(1, 1), (2, 1), (4, 1), (5, 2), (8, 2), (9, 3), (11, 3)])
def test_encode_keeps_the_newest_1_plus_4k_frames(vae, frames, expected):
    pixels = clip(frames, seed=frames)
    latents = vae.encode(pixels)
    assert latents.shape == (1, expected, Z_DIM, 4, 4)
    kept = video_frames(expected)
    assert torch.equal(latents, vae.encode(pixels[:, frames - kept:]))  # the oldest frames were dropped


def test_encode_refuses_clips_it_cannot_encode(vae):
    with pytest.raises(VideoError, match="multiples of 8"):
        vae.encode(clip(1, size=20))
    with pytest.raises(VideoError, match=r"\(B, F, 3, H, W\)"):
        vae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(VideoError, match="no frames"):
        vae.encode(torch.zeros(1, 0, 3, 32, 32))


def test_bad_vae_folders(base, tmp_path):
    with pytest.raises(CheckpointError, match="has no vae/"):
        WanVAE.from_base(tmp_path)
    folder = tmp_path / "vae"
    shutil.copytree(base / "vae", folder)
    config = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps({**config, "latents_std": config["latents_std"][:-1]}))
    with pytest.raises(CheckpointError, match="latents_std must be a list of 4 numbers"):
        WanVAE.from_folder(folder)
    (folder / "config.json").write_text(json.dumps({**config, "patch_size": 2, "is_residual": True}))
    with pytest.raises(CheckpointError, match="Wan2.2"):
        WanVAE.from_folder(folder)
    (folder / "config.json").write_text(json.dumps({**config, "base_dim": 16}))  # the weights are base_dim 8
    with pytest.raises(CheckpointError):
        WanVAE.from_folder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read the Wan VAE config"):
        WanVAE.from_folder(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no diffusion_pytorch_model.safetensors"):
        WanVAE.from_folder(folder)


def test_the_tiny_base_is_in_the_real_layout_and_deterministic(base, tmp_path):
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    parts = {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
    assert set(index) - {"_class_name", "_diffusers_version"} == parts
    config = json.loads((base / "transformer" / "config.json").read_text())
    sizes = (config["text_dim"], config["in_channels"], config["out_channels"], config["patch_size"])
    assert sizes == (32, Z_DIM, Z_DIM, [1, 2, 2])
    transformer = WanTransformer3DModel.from_config(config)  # the config is one diffusers builds
    assert transformer.config.num_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(str(base / "tokenizer"))
    assert tokenizer("a Fox zebra").input_ids == [3, 14, 2, 1]  # a, fox, <unk>, </s>
    UniPCMultistepScheduler.from_config(json.loads((base / "scheduler" / "scheduler_config.json").read_text()))

    again = make_wan_base(tmp_path / "again", seed=3, num_layers=3, ffn_dim=48)
    assert json.loads((again / "transformer" / "config.json").read_text())["num_layers"] == 3
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = load_file(str(base / name)), load_file(str(again / name))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = make_wan_base(tmp_path / "other", seed=4)
    assert not torch.equal(load_file(str(other / "text_encoder/model.safetensors"))["shared.weight"],
                           load_file(str(base / "text_encoder/model.safetensors"))["shared.weight"])
