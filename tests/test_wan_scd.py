"""SCD from Wan (the paper's post-training recipe): conversion of a causal Wan2.1 into an encoder of
blocks run once per chunk and a decoder of blocks run per step, its stream (cache vs recompute),
the locality of its decoder, its teacher-forcing loss, and text to video through the CLI."""

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import random_model
from scd.convert import Split, wan_split
from scd.models import WanConfig
from scd.models.wan import teacher_forcing_mask
from scd.sampling import generate
from scd_cli.app import app

FIXTURES = Path(__file__).parent / "fixtures" / "reference"


def tiny(**overrides) -> WanConfig:
    base = dict(dim=24, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=4, text_dim=8, text_len=5, channels=4,
                chunk_frames=2, latent_size=(4, 6), frame_size=(32, 48), arch="scd", encoder_layers=3,
                decoder_layers=2, num_layers_note=None)
    base.pop("num_layers_note")
    base.update(overrides)
    if base["arch"] == "scd":
        base["num_layers"] = base["encoder_layers"] + base["decoder_layers"]
    return WanConfig(**base)


def random(config: WanConfig, seed: int = 0):
    return random_model(config, seed)


def test_the_papers_split_is_the_default_for_30_blocks():
    assert wan_split(Split(), 30) == (tuple(range(25)), tuple(range(5)) + tuple(range(25, 30)))
    assert wan_split(Split(encoder_blocks="0-1", decoder_blocks="1,3"), 4) == ((0, 1), (1, 3))
    enc, dec = wan_split(Split(), 12)
    assert enc == tuple(range(10)) and dec == (0, 1, 10, 11)


def test_stream_equals_the_uncached_teacher_forcing_pass():
    """The encoder's cached stream computes what one masked pass over [clean chunk; noise chunk]
    computes: chunk 2's first-step flow, streamed, equals the recomputation without a cache."""
    config = tiny()
    model = random(config)
    text = torch.randn(1, 5, 8)
    clean = torch.randn(1, 2, 4, 4, 6)  # a prompt chunk
    noise = torch.randn(1, 2, 4, 4, 6)
    with torch.inference_mode():
        state = model.start(1, 8, text=text, latent_size=(4, 6))
        model.observe(state, clean, None)
        model.prepare(state, None)
        streamed = model.velocity(state, noise, torch.full((1,), 1000.0))
        t = torch.tensor([[0.0, 0.0, 1000.0, 1000.0]])
        mask = teacher_forcing_mask(2, 2, 6, "cpu")  # [clean 0, 1; noisy 0, 1]: frames 0-1 of each, one chunk
        # in the recomputation the noise chunk is the second chunk: positions 2, 3, after the clean one
        frames = torch.cat([clean, noise], 1)
        chunks = torch.tensor([0, 0, 1, 1])
        frame_mask = chunks[None] <= chunks[:, None]
        frame_mask[2:, 2:] = True
        full_mask = frame_mask.repeat_interleave(6, 0).repeat_interleave(6, 1)
        hidden = model.encoder.run(frames, t, model.encoder.text_kv(text), torch.arange(4), mask=full_mask)
        recomputed = model.decode(noise, torch.full((1, 2), 1000.0), hidden[:, 2:], model.decoder.text_kv(text))
    assert mask.shape == (24, 24)
    assert (streamed - recomputed).abs().max() < 1e-5


def test_the_decoder_stays_inside_each_frame():
    config = tiny()
    model = random(config)
    text = torch.randn(1, 5, 8)
    noisy = torch.randn(1, 2, 4, 4, 6)
    features = torch.randn(1, 2, 6, 24)
    kv = model.decoder.text_kv(text)
    t = torch.full((1, 2), 600.0)
    with torch.no_grad():
        base = model.decode(noisy, t, features, kv)
        changed = features.clone()
        changed[:, 1] += torch.randn_like(changed[:, 1])  # not a constant: LayerNorm removes those
        other = model.decode(noisy, t, changed, kv)
    assert torch.equal(base[:, 0], other[:, 0]) and (base[:, 1] - other[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("encoder_input", ["noise", "none"])
def test_training_loss_reaches_both_parts_and_learns(encoder_input):
    config = tiny(encoder_input=encoder_input)
    model = random(config).train()
    video, text = torch.randn(2, 4, 4, 4, 6) * 0.5, torch.randn(2, 5, 8)
    torch.manual_seed(1)
    loss = model.loss(video, text)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    assert model.decoder.head.head.weight.grad.abs().sum() > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step % 2)  # two fixed draws: the loss on them must fall
        optimizer.zero_grad()
        loss = model.loss(video, text)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_the_causal_wan_loss_matches_its_stream():
    """The causal model's teacher-forcing pass sees what its stream sees: a noisy chunk's flow in the
    masked pass equals the streamed step with the clean chunk before it in the cache."""
    config = tiny(arch="baseline", encoder_layers=0, decoder_layers=0, num_layers=3)
    model = random(config)
    text = torch.randn(1, 5, 8)
    clean, noisy = torch.randn(1, 2, 4, 4, 6), torch.randn(1, 2, 4, 4, 6)
    with torch.inference_mode():
        state = model.start(1, 8, text=text, latent_size=(4, 6))
        model.observe(state, clean, None)
        model.prepare(state, None)
        streamed = model.velocity(state, noisy, torch.full((1,), 750.0))
        mask = teacher_forcing_mask(4, 2, 6, "cpu")
        video = torch.cat([clean, noisy], 1)  # frames 0-3; the teacher-forced chunk 1 is `noisy`
        t = torch.tensor([[0.0] * 4 + [0.0, 0.0, 750.0, 750.0]])
        tokens = torch.cat([video, video], 1)
        tokens[:, 6:] = noisy
        flow = model.run(tokens, t, model.text_kv(text), torch.arange(4).repeat(2), mask=mask)[:, 6:]
    assert (streamed - flow).abs().max() < 1e-5


def test_scd_wan_streams_and_text_matters():
    config = tiny()
    model = random(config)
    context = torch.zeros(1, 0, 4, 4, 6)
    a = generate(model, context, 4, 4, text=torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0)), seed=2)
    b = generate(model, context, 4, 4, text=torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0)), seed=2)
    c = generate(model, context, 4, 4, text=torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(1)), seed=2)
    assert a.shape == (1, 4, 4, 4, 6) and torch.equal(a, b) and (a - c).abs().max() > 1e-3


def test_encoder_input_none_needs_a_prompt():
    config = tiny(encoder_input="none")
    model = random(config)
    with pytest.raises(Exception, match="prompt clip"):
        generate(model, torch.zeros(1, 0, 4, 4, 6), 2, 4, text=torch.randn(1, 5, 8))
    out = generate(model, torch.randn(1, 2, 4, 4, 6), 2, 4, text=torch.randn(1, 5, 8))
    assert out.shape == (1, 2, 4, 4, 6) and torch.isfinite(out).all()


def test_convert_to_scd_by_default_and_explicit_blocks(tmp_path):
    runner = CliRunner()
    source = FIXTURES / "sfwan0" / "generator.pt"
    r = runner.invoke(app, ["convert", str(source), "--to", "scd", "--out", str(tmp_path / "a"), "-q"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["arch"] == "scd" and config["source_blocks"] == [[0], [0, 1]]
    r = runner.invoke(app, ["convert", str(source), "--to", "scd", "--encoder-blocks", "0-1", "--decoder-blocks", "1",
                            "--decoder-combine", "add", "--encoder-input", "none", "--out", str(tmp_path / "b"), "-q"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["source_blocks"] == [[0, 1], [1]] and config["decoder_combine"] == "add"
    assert config["encoder_input"] == "none"
    from safetensors.torch import load_file

    converted = load_file(str(tmp_path / "b" / "model.safetensors"))
    original = load_file(str(FIXTURES / "sfwan0" / "model.safetensors"))
    assert torch.equal(converted["decoder.blocks.0.ffn.0.weight"], original["blocks.1.ffn.0.weight"])
    assert torch.equal(converted["encoder.blocks.1.self_attn.q.weight"], original["blocks.1.self_attn.q.weight"])
    assert "encoder.head.head.weight" not in converted and "decoder.head.head.weight" in converted
    for bad, words in ((["--decoder-blocks", "7"], "names block 7"), (["--decoder-combine", "concat"], "decoder_combine"),
                       (["--encoder-input", "half"], "encoder_input")):
        r = runner.invoke(app, ["convert", str(source), "--to", "scd", *bad, "--out", str(tmp_path / "c"), "--overwrite"])
        assert r.exit_code == 2 and words in r.output.replace("--", ""), r.output


def test_converted_scd_wan_generates_from_text(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from wan_base import make_wan_base

    from scd.wan_reference import wan_config

    base = make_wan_base(tmp_path / "base")
    causal = random(wan_config(tmp_path / "x.pt", base))
    torch.save({"generator_ema": {"model." + k: v for k, v in causal.state_dict().items()}}, tmp_path / "gen.pt")
    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(tmp_path / "gen.pt"), "--base", str(base), "--to", "scd",
                            "--out", str(tmp_path / "scd"), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "scd"), "--prompt", "a fox", "--frames", "5",
                            "--size", "32x48", "--out", str(tmp_path / "o.mp4")])
    assert r.exit_code == 0, r.output
    from scd.video import read_video

    assert read_video(tmp_path / "o.mp4").frames.shape == (9, 32, 48, 3)
