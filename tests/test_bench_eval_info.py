"""scd bench, scd eval and scd info: FLOP formulas, result structure, CLI ends."""

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from conftest import random_model, tiny_config
from scd.checkpoints import save_model_folder
from scd.evaluate import _summary, evaluate
from scd.flops import block_flops, frame_flops
from scd_cli.app import app

runner = CliRunner()


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("combine", ["token_concat", "add"])
def test_frame_flops_match_counted_matmuls(combine):
    """flops.py against torch's own count of one encoder pass, decoder step and baseline step."""
    config = tiny_config(num_heads=4, head_dim=16, rope_axes=(4, 6, 6), latent_size=(8, 8), decoder_combine=combine)
    scd, base = random_model(config), random_model(config.matched())
    context, t = 5, config.tokens_per_frame
    x = torch.randn(1, config.channels, 8, 8)
    cache = scd.encoder.new_cache(1, 8)
    scd.encoder(torch.randn(1, context, config.channels, 8, 8), None, cache)
    labels = torch.zeros(1, 1, dtype=torch.long)
    encoder = counted(lambda: scd.encoder(x[:, None], labels, cache))
    features = torch.randn(1, t, config.width)
    decoder = counted(lambda: scd.decoder(x, torch.full((1,), 500.0), features, labels[:, 0]))
    bcache = base.new_cache(1, 8)
    base.append(torch.randn(1, context, config.channels, 8, 8), None, bcache)
    step = counted(lambda: base(x, torch.full((1,), 500.0), labels[:, 0], bcache))
    predicted = frame_flops(config, context, steps=1)
    # torch's counter does not see the CPU attention kernel: add its 4 S S_kv D per layer by hand
    d, le, ld, lb = config.width, config.encoder_layers, config.decoder_layers, config.layers
    s = 2 * t if combine == "token_concat" else t
    attention = {"encoder": le * 4 * t * (context + 1) * t * d, "decoder": ld * 4 * s * s * d,
                 "baseline": lb * 4 * t * (context + 1) * t * d}
    assert abs(predicted.context - (encoder + attention["encoder"])) / predicted.context < 0.05
    assert abs(predicted.denoise - (decoder + attention["decoder"])) / predicted.denoise < 0.05
    base_step = frame_flops(config.matched(), context, steps=1).denoise
    assert abs(base_step - (step + attention["baseline"])) / base_step < 0.05


def test_block_flops_formula():
    assert block_flops(8, 2, 6, conditionings=0) == 24 * 2 * 64 + 4 * 2 * 6 * 8


def test_eval_scores_hand_made_cases():
    truth = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    same = _summary(truth, truth)
    assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0)
    off = np.clip(truth.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = ((off.astype(float) - truth) / 255) ** 2
    expected = np.mean([10 * np.log10(1 / m.mean()) for m in mse.reshape(6, -1)])
    assert _summary(off, truth)["psnr"] == pytest.approx(expected, rel=1e-6)


def test_eval_runs_models_and_copy_last_frame(tmp_path):
    world = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8)
    models = {}
    for arch in ("scd", "baseline"):
        from scd.checkpoints import load_model_folder
        models[arch] = load_model_folder(save_model_folder(random_model(tiny_config(arch=arch, **world)), tmp_path / arch))
    result = evaluate(models, clips=2, context=3, frames=2, steps=2)
    assert result["clips"] == 2 and result["frames"] == 2
    for name in ("scd", "baseline", "copy_last_frame"):
        assert len(result[name]["psnr_per_frame"]) == 2 and 0 < result[name]["psnr"] < 100
    json_path = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "scd"), "--baseline", str(tmp_path / "baseline"),
                            "--clips", "1", "--context", "2", "--frames", "1", "--steps", "1", "--json", str(json_path)])
    assert r.exit_code == 0, r.output
    written = json.loads(json_path.read_text())
    assert set(written) >= {"scd", "baseline", "copy_last_frame", "clips", "frames", "context", "steps"}
    assert written["clips"] == 1 and written["context"] == 2 and written["steps"] == 1
    assert len(written["scd"]["psnr_per_frame"]) == 1 and set(written["scd"]) >= {"psnr", "ssim", "psnr_per_frame"}


def test_info_on_a_reference_checkpoint():
    from pathlib import Path

    ref = Path(__file__).parent / "fixtures" / "reference" / "case1"
    r = runner.invoke(app, ["info", str(ref / "ema.pth"), "--options", str(ref / "options.yml")])
    assert r.exit_code == 0, r.output
    assert "3 encoder + 2 decoder" in r.output and "predicted SCD speed-up" in r.output
    r = runner.invoke(app, ["info", str(ref / "ema.pth")])
    assert r.exit_code == 2 and "give its options file" in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "scd 0.1.0" in r.output
