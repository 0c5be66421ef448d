"""A deeper model from a trained one (`scd.models.far.deepen`, `scd train --grow-encoder`): the new
blocks start as the identity, so the deeper model generates what the trained one did, and they
learn from the first step."""

import pytest
import torch
from conftest import random_model, stream_inputs, tiny_config

from scd.errors import ConfigError
from scd.models.far import deepen
from scd.sampling import generate


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_a_deepened_model_generates_what_it_did_and_its_new_blocks_learn(arch):
    config = tiny_config(arch=arch, layers=3 if arch == "scd" else 2)
    model = random_model(config)
    deeper = deepen(model, 2).eval()
    assert deeper.config.layers == config.layers + 2 and deeper.config.decoder_layers == config.decoder_layers
    grown = deeper.encoder if arch == "scd" else deeper
    assert len(grown.transformer_blocks) == config.layers - config.decoder_layers + 2
    if arch == "scd":  # the decoder is as it was: only the encoder grows
        assert len(deeper.decoder.transformer_blocks) == config.decoder_layers
    context, actions, noise = stream_inputs(config, 2, 3, 4)
    before = generate(model, context, 4, 3, conditions=actions, noise=noise)
    after = generate(deeper, context, 4, 3, conditions=actions, noise=noise)
    assert torch.equal(before, after)
    new_blocks = list(grown.transformer_blocks)[-2:]
    assert all(float(b.attn.to_qkv.weight.detach().abs().sum()) > 0 for b in new_blocks)  # drawn, not copies of zero
    video = torch.randn(2, 4, config.channels, *config.latent_size)
    deeper.train().loss(video, actions[:, :4]).backward()
    assert all(float(b.norm1.linear.weight.grad.abs().sum()) > 0 for b in new_blocks)


def test_deepen_refuses_a_nonsense_count():
    model = random_model(tiny_config())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="blocks"):
            deepen(model, bad)


def test_scd_train_grows_the_initial_model_and_resumes_grown(tmp_path):
    from typer.testing import CliRunner

    from scd.checkpoints import load_model
    from scd_cli.app import app

    runner = CliRunner()
    tiny = ["--heads", "2", "--head-dim", "8", "--layers", "3", "--decoder-layers", "1", "--patch-size", "8"]
    run = ["--batch-size", "2", "--clip-frames", "4", "--threads", "1", "-q"]
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "m"), *tiny, *run, "--steps", "2"])
    assert r.exit_code == 0, r.output
    grow = ["train", "--init", str(tmp_path / "m"), "--out", str(tmp_path / "g"), "--grow-encoder", "2", *run]
    r = runner.invoke(app, [*grow, "--steps", "2", "--checkpoint-every", "1"])
    assert r.exit_code == 0, r.output
    config = load_model(str(tmp_path / "g")).config
    assert (config.layers, config.decoder_layers, config.encoder_layers) == (5, 1, 4)
    r = runner.invoke(app, [*grow, "--steps", "3", "--resume"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), *tiny, *run, "--steps", "1", "--grow-encoder", "1"])
    assert r.exit_code == 2 and "--init" in r.output and "Traceback" not in r.output, r.output
    grown_once = ["train", "--init", str(tmp_path / "m"), "--out", str(tmp_path / "g"), "--grow-encoder", "1", *run]
    r = runner.invoke(app, [*grown_once, "--steps", "4", "--resume"])  # resumed at another depth: refused, nothing lost
    assert r.exit_code == 2 and "another model config" in r.output and "Traceback" not in r.output, r.output
    assert load_model(str(tmp_path / "g")).config.layers == 5
